//! Classic BPF as seccomp runs it: the instruction type, its kernel encoding, an assembler
//! with forward labels, and an evaluator of a program over one syscall.

/// The kernel's `struct sock_filter`: one classic BPF instruction.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockFilter {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

/// The kernel accepts at most this many instructions in one filter.
pub(crate) const MAX_INSNS: usize = 4096;

// Opcodes (class | size/op | source), as <linux/bpf_common.h> composes them.
pub(crate) const LD_W_ABS: u16 = 0x20;
pub(crate) const LD_IMM: u16 = 0x00;
pub(crate) const AND_K: u16 = 0x54;
pub(crate) const LSH_X: u16 = 0x6c;
pub(crate) const TAX: u16 = 0x07;
pub(crate) const TXA: u16 = 0x87;
pub(crate) const RET_K: u16 = 0x06;
pub(crate) const JA: u16 = 0x05;
pub(crate) const JEQ_K: u16 = 0x15;
pub(crate) const JGT_K: u16 = 0x25;
pub(crate) const JGE_K: u16 = 0x35;
pub(crate) const JSET_K: u16 = 0x45;

/// `struct seccomp_data` offsets: the syscall number, the audit architecture, and the
/// low word of argument 0 (each argument is a 64-bit little-endian pair of words).
pub(crate) const NR: u32 = 0;
pub(crate) const ARCH: u32 = 4;
pub(crate) const ARGS: u32 = 16;

/// What a filter returns when it has no answer: kill the thread, as the kernel would for
/// a program that runs off its end (the kernel refuses to load such a program anyway).
pub(crate) const RET_KILL_THREAD: u32 = 0;

/// One syscall as a filter sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SeccompData {
    pub nr: u32,
    pub arch: u32,
    pub args: [u64; 6],
}

impl SeccompData {
    /// The 32-bit word at `offset` of `struct seccomp_data` on a little-endian machine
    /// (an argument's low word first), the only kind [`crate::compact`] builds for.
    fn word(&self, offset: u32) -> u32 {
        match offset {
            NR => self.nr,
            ARCH => self.arch,
            o if (ARGS..ARGS + 48).contains(&o) && o % 4 == 0 => {
                let arg = self.args[((o - ARGS) / 8) as usize];
                if (o - ARGS) % 8 == 0 {
                    arg as u32
                } else {
                    (arg >> 32) as u32
                }
            }
            // The instruction pointer is never looked at by the filters built here.
            _ => 0,
        }
    }
}

/// Runs `program` on one syscall as the kernel does, for the instructions seccomp filters
/// built by libseccomp and by [`crate::compact`] use; anything else (and running off the
/// end, or jumping past it) kills, as an invalid program would never be loaded.
pub(crate) fn evaluate(program: &[SockFilter], data: &SeccompData) -> u32 {
    let (mut pc, mut a, mut x) = (0usize, 0u32, 0u32);
    while let Some(insn) = program.get(pc) {
        pc += 1;
        match insn.code {
            LD_W_ABS => a = data.word(insn.k),
            LD_IMM => a = insn.k,
            AND_K => a &= insn.k,
            LSH_X => a = a.checked_shl(x).unwrap_or(0),
            TAX => x = a,
            TXA => a = x,
            RET_K => return insn.k,
            JA => pc += insn.k as usize,
            JEQ_K | JGT_K | JGE_K | JSET_K => {
                let taken = match insn.code {
                    JEQ_K => a == insn.k,
                    JGT_K => a > insn.k,
                    JGE_K => a >= insn.k,
                    _ => a & insn.k != 0,
                };
                pc += usize::from(if taken { insn.jt } else { insn.jf });
            }
            _ => return RET_KILL_THREAD,
        }
    }
    RET_KILL_THREAD
}

/// A place in a program being assembled, bound once its instruction is known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Label(usize);

/// A jump that cannot be encoded: classic BPF jumps only forward, conditional ones at
/// most 255 instructions.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Unencodable;

enum Insn {
    Plain(SockFilter),
    Jump {
        code: u16,
        k: u32,
        jt: Label,
        jf: Label,
    },
    Always(Label),
}

/// Builds a program whose jumps name labels bound later.
#[derive(Default)]
pub(crate) struct Assembler {
    insns: Vec<Insn>,
    labels: Vec<Option<usize>>,
}

impl Assembler {
    pub fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    /// Binds `label` to the next instruction emitted.
    pub fn bind(&mut self, label: Label) {
        self.labels[label.0] = Some(self.insns.len());
    }

    pub fn stmt(&mut self, code: u16, k: u32) {
        self.insns.push(Insn::Plain(SockFilter {
            code,
            jt: 0,
            jf: 0,
            k,
        }));
    }

    pub fn jump(&mut self, code: u16, k: u32, jt: Label, jf: Label) {
        self.insns.push(Insn::Jump { code, k, jt, jf });
    }

    pub fn always(&mut self, target: Label) {
        self.insns.push(Insn::Always(target));
    }

    /// The program with every jump resolved to its offset.
    pub fn finish(self) -> Result<Vec<SockFilter>, Unencodable> {
        let offset = |from: usize, to: Label| -> Result<usize, Unencodable> {
            let to = self.labels[to.0].ok_or(Unencodable)?;
            to.checked_sub(from + 1).ok_or(Unencodable)
        };
        let short = |from, to| u8::try_from(offset(from, to)?).map_err(|_| Unencodable);
        self.insns
            .iter()
            .enumerate()
            .map(|(at, insn)| {
                Ok(match *insn {
                    Insn::Plain(filter) => filter,
                    Insn::Jump { code, k, jt, jf } => SockFilter {
                        code,
                        jt: short(at, jt)?,
                        jf: short(at, jf)?,
                        k,
                    },
                    Insn::Always(target) => SockFilter {
                        code: JA,
                        jt: 0,
                        jf: 0,
                        k: u32::try_from(offset(at, target)?).map_err(|_| Unencodable)?,
                    },
                })
            })
            .collect()
    }
}

/// The kernel (native-endian) encoding of a program.
pub(crate) fn encode(program: &[SockFilter]) -> Vec<u8> {
    program
        .iter()
        .flat_map(|i| {
            let mut b = [0u8; 8];
            b[0..2].copy_from_slice(&i.code.to_ne_bytes());
            b[2] = i.jt;
            b[3] = i.jf;
            b[4..8].copy_from_slice(&i.k.to_ne_bytes());
            b
        })
        .collect()
}

/// Instructions from their kernel encoding; a partial tail is dropped.
pub(crate) fn decode(bytes: &[u8]) -> Vec<SockFilter> {
    bytes
        .chunks_exact(8)
        .map(|c| SockFilter {
            code: u16::from_ne_bytes([c[0], c[1]]),
            jt: c[2],
            jf: c[3],
            k: u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(nr: u32, args: [u64; 6]) -> SeccompData {
        SeccompData { nr, arch: 7, args }
    }

    #[test]
    fn assembled_jumps_land_on_their_labels() {
        let mut asm = Assembler::default();
        let (big, small) = (asm.label(), asm.label());
        asm.stmt(LD_W_ABS, NR);
        asm.jump(JGT_K, 10, big, small);
        asm.bind(small);
        asm.stmt(RET_K, 1);
        asm.bind(big);
        asm.stmt(RET_K, 2);
        let program = asm.finish().unwrap();
        assert_eq!(program[1].jt, 1);
        assert_eq!(program[1].jf, 0);
        assert_eq!(evaluate(&program, &data(3, [0; 6])), 1);
        assert_eq!(evaluate(&program, &data(11, [0; 6])), 2);
        assert_eq!(decode(&encode(&program)), program);
    }

    #[test]
    fn backward_far_and_unbound_jumps_are_refused() {
        let mut asm = Assembler::default();
        let back = asm.label();
        asm.bind(back);
        asm.always(back);
        assert_eq!(asm.finish(), Err(Unencodable));

        let mut asm = Assembler::default();
        let (far, near) = (asm.label(), asm.label());
        asm.jump(JEQ_K, 0, far, near);
        asm.bind(near);
        for _ in 0..256 {
            asm.stmt(LD_IMM, 0);
        }
        asm.bind(far);
        asm.stmt(RET_K, 0);
        assert_eq!(asm.finish(), Err(Unencodable));

        let mut asm = Assembler::default();
        let nowhere = asm.label();
        asm.always(nowhere);
        assert_eq!(asm.finish(), Err(Unencodable));
    }

    #[test]
    fn arguments_are_read_as_two_little_words_and_shifts_by_x_work() {
        let insn = |code, k| SockFilter {
            code,
            jt: 0,
            jf: 0,
            k,
        };
        let program = [
            insn(LD_W_ABS, ARGS + 8 + 4), // argument 1, high word
            insn(TAX, 0),
            insn(LD_IMM, 1),
            insn(LSH_X, 0),
            SockFilter {
                code: JEQ_K,
                jt: 0,
                jf: 1,
                k: 1 << 5,
            },
            insn(RET_K, 1),
            insn(RET_K, 2),
        ];
        assert_eq!(
            evaluate(&program, &data(0, [0, 5 << 32 | 9, 0, 0, 0, 0])),
            1
        );
        assert_eq!(evaluate(&program, &data(0, [0, 5, 0, 0, 0, 0])), 2);
        // An instruction these filters never use (ret A) kills, as does running off the end.
        assert_eq!(
            evaluate(&[insn(0x16, 0)], &data(0, [0; 6])),
            RET_KILL_THREAD
        );
        assert_eq!(evaluate(&program[..4], &data(0, [0; 6])), RET_KILL_THREAD);
    }
}
