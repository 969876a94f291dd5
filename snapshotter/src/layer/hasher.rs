//! The SHA-256 of a layer stream, computed on a helper thread once the stream is large.
//!
//! One core hashes SHA-256 at about the speed `tar -c` moves a tree (≈1.8 GB/s here, with
//! the CPU's SHA extensions), so hashing in the thread that also reads files, builds the
//! tar and compresses made a layer's export cost the sum of both. Past the first chunk the
//! bytes go to a thread of their own and the two run side by side; a small stream (most
//! layers of a build) is hashed in place without starting a thread.

use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, sync_channel};
use std::thread::JoinHandle;

use sha2::{Digest, Sha256};

/// Bytes handed to the helper at a time.
const CHUNK: usize = 256 * 1024;
/// Chunks that may wait for the helper; the writer blocks beyond that (memory stays
/// bounded at `(IN_FLIGHT + 1) × CHUNK` when the producer is faster than the hash).
const IN_FLIGHT: usize = 4;

/// A running SHA-256 over a stream written in pieces of any size.
#[derive(Debug)]
pub(crate) struct StreamHasher {
    pending: Vec<u8>,
    state: State,
}

#[derive(Debug)]
enum State {
    /// Nothing handed off yet: `pending` is hashed at `finish` if the stream ends first.
    Fresh,
    /// No helper could be started (a process limit): hashed in this thread.
    InPlace(Sha256),
    Helper {
        chunks: SyncSender<Vec<u8>>,
        /// Chunks the helper has hashed, back for reuse.
        spare: Receiver<Vec<u8>>,
        allocated: usize,
        helper: JoinHandle<Sha256>,
    },
}

impl StreamHasher {
    pub(crate) fn new() -> Self {
        StreamHasher {
            pending: Vec::new(),
            state: State::Fresh,
        }
    }

    pub(crate) fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.pending.capacity() == 0 {
                self.pending.reserve_exact(CHUNK);
            }
            let take = (CHUNK - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.pending.len() == CHUNK {
                self.hand_off();
            }
        }
    }

    /// Passes the full `pending` chunk to the helper (started on the first one).
    fn hand_off(&mut self) {
        if matches!(self.state, State::Fresh) {
            self.state = start_helper();
        }
        match &mut self.state {
            State::InPlace(hash) => {
                hash.update(&self.pending);
                self.pending.clear();
            }
            // `start_helper` never leaves it fresh; hashed in place all the same.
            State::Fresh => {
                self.state = State::InPlace(Sha256::new_with_prefix(&self.pending));
                self.pending.clear();
            }
            State::Helper {
                chunks,
                spare,
                allocated,
                ..
            } => {
                let next = match spare.try_recv() {
                    Ok(buffer) => buffer,
                    Err(TryRecvError::Empty) if *allocated <= IN_FLIGHT => {
                        *allocated += 1;
                        Vec::with_capacity(CHUNK)
                    }
                    // Wait for the helper to give one back.
                    Err(_) => spare.recv().unwrap_or_else(|_| Vec::with_capacity(CHUNK)),
                };
                let full = std::mem::replace(&mut self.pending, next);
                // A helper that is gone (it panicked) is reported by `finish`.
                let _ = chunks.send(full);
            }
        }
    }

    /// The digest, `sha256:<hex>`.
    pub(crate) fn finish(self) -> std::io::Result<String> {
        let hash = match self.state {
            State::Fresh => Sha256::new_with_prefix(&self.pending),
            State::InPlace(mut hash) => {
                hash.update(&self.pending);
                hash
            }
            State::Helper {
                chunks,
                helper,
                spare,
                ..
            } => {
                if !self.pending.is_empty() {
                    // A failed send shows as the helper's panic below.
                    let _ = chunks.send(self.pending);
                }
                drop(chunks);
                drop(spare);
                helper
                    .join()
                    .map_err(|_| std::io::Error::other("the layer's hashing thread panicked"))?
            }
        };
        Ok(super::descriptor::digest_string(hash.finalize()))
    }
}

/// The helper thread, or [`State::InPlace`] when none can be started.
fn start_helper() -> State {
    let (chunks, incoming) = sync_channel::<Vec<u8>>(IN_FLIGHT);
    let (returned, spare) = sync_channel::<Vec<u8>>(IN_FLIGHT + 1);
    let started = std::thread::Builder::new()
        .name("kiln-sha256".into())
        .spawn(move || {
            let mut hash = Sha256::new();
            for mut chunk in incoming {
                hash.update(&chunk);
                chunk.clear();
                // The writer may be gone (an export that failed): nothing to give back to.
                let _ = returned.try_send(chunk);
            }
            hash
        });
    match started {
        Ok(helper) => State::Helper {
            chunks,
            spare,
            allocated: 1,
            helper,
        },
        Err(e) => {
            tracing::debug!(error = %e, "no thread for hashing the layer: hashed in place");
            State::InPlace(Sha256::new())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn in_pieces(data: &[u8], piece: usize) -> String {
        let mut hasher = StreamHasher::new();
        for part in data.chunks(piece) {
            hasher.update(part);
        }
        hasher.finish().unwrap()
    }

    #[test]
    fn any_split_gives_the_digest_of_the_whole() {
        // Past several chunks and IN_FLIGHT, so the helper and the buffer reuse both run;
        // not a multiple of CHUNK, so the tail is sent at finish.
        let data: Vec<u8> = (0..(CHUNK * (IN_FLIGHT + 3) + 12345))
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let expected = super::super::descriptor::digest_string(Sha256::digest(&data));
        for piece in [1 << 20, CHUNK, 8192, 4097, CHUNK * 3 + 1] {
            assert_eq!(in_pieces(&data, piece), expected, "pieces of {piece}");
        }
        let small = &data[..1000];
        assert_eq!(
            in_pieces(small, 10),
            super::super::descriptor::digest_string(Sha256::digest(small))
        );
        assert_eq!(
            StreamHasher::new().finish().unwrap(),
            super::super::descriptor::digest_string(Sha256::digest(b""))
        );
    }
}
