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
    /// Hashed in this thread: until the first full chunk (`may_start`), or for good when
    /// no helper could be started (a process limit).
    InPlace {
        hash: Sha256,
        may_start: bool,
    },
    Helper(Helper),
}

/// The helper thread and the chunks going to it and coming back.
#[derive(Debug)]
struct Helper {
    chunks: SyncSender<Vec<u8>>,
    /// Chunks the helper has hashed, back for reuse.
    spare: Receiver<Vec<u8>>,
    allocated: usize,
    thread: JoinHandle<Sha256>,
}

impl StreamHasher {
    pub(crate) fn new() -> Self {
        StreamHasher {
            pending: Vec::new(),
            state: State::InPlace {
                hash: Sha256::new(),
                may_start: true,
            },
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

    /// Hashes the full `pending` chunk: on the helper (started on the first chunk).
    fn hand_off(&mut self) {
        if let State::InPlace {
            may_start: may_start @ true,
            ..
        } = &mut self.state
        {
            match Helper::start() {
                Ok(helper) => self.state = State::Helper(helper),
                Err(e) => {
                    tracing::debug!(error = %e, "no thread for hashing the layer: hashed in place");
                    *may_start = false;
                }
            }
        }
        match &mut self.state {
            State::InPlace { hash, .. } => {
                hash.update(&self.pending);
                self.pending.clear();
            }
            State::Helper(helper) => helper.send(&mut self.pending),
        }
    }

    /// The digest, `sha256:<hex>`.
    pub(crate) fn finish(self) -> std::io::Result<String> {
        let hash = match self.state {
            State::InPlace { mut hash, .. } => {
                hash.update(&self.pending);
                hash
            }
            State::Helper(helper) => helper.finish(self.pending)?,
        };
        Ok(super::descriptor::digest_string(hash.finalize()))
    }
}

impl Helper {
    fn start() -> std::io::Result<Helper> {
        let (chunks, incoming) = sync_channel::<Vec<u8>>(IN_FLIGHT);
        let (returned, spare) = sync_channel::<Vec<u8>>(IN_FLIGHT + 1);
        let thread = std::thread::Builder::new()
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
            })?;
        Ok(Helper {
            chunks,
            spare,
            allocated: 1,
            thread,
        })
    }

    /// Sends `full` to the helper, leaving an empty buffer in its place.
    fn send(&mut self, full: &mut Vec<u8>) {
        let next = match self.spare.try_recv() {
            Ok(buffer) => buffer,
            Err(TryRecvError::Empty) if self.allocated <= IN_FLIGHT => {
                self.allocated += 1;
                Vec::with_capacity(CHUNK)
            }
            // Wait for the helper to give one back.
            Err(_) => self
                .spare
                .recv()
                .unwrap_or_else(|_| Vec::with_capacity(CHUNK)),
        };
        // A helper that is gone (it panicked) is reported by `finish`.
        let _ = self.chunks.send(std::mem::replace(full, next));
    }

    /// The hash of everything sent and of `last`.
    fn finish(self, last: Vec<u8>) -> std::io::Result<Sha256> {
        if !last.is_empty() {
            // A failed send shows as the helper's panic below.
            let _ = self.chunks.send(last);
        }
        drop(self.chunks);
        drop(self.spare);
        self.thread
            .join()
            .map_err(|_| std::io::Error::other("the layer's hashing thread panicked"))
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
