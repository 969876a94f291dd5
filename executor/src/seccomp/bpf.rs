//! Compiling a seccomp rule set to classic BPF as a balanced binary search on the syscall
//! number.
//!
//! Why not seccompiler (which kiln used first): it emits one linear chain (1,543
//! instructions for the default profile), and the kernel prepares its per-syscall action
//! cache by running the filter once for every syscall number when it is installed. That
//! cost about 1 ms per step, a sixth of starting one. With a search tree each run is a few
//! dozen instructions, the install is cheap, and syscalls with argument checks are
//! filtered faster too. One filter also holds every action, so `clone3 → ENOSYS` needs no
//! second filter.
//!
//! Conditional jumps reach 255 instructions; the assembler relaxes the few that must go
//! further into `jcond 0,1; ja t; ja f` (`ja` takes a 32-bit offset).

/// `struct sock_filter`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockFilter {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

/// Errors from assembling a program.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BpfError {
    #[error("seccomp program has {0} instructions, more than the kernel's 4096")]
    TooLong(usize),
}

const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JEQ_K: u16 = 0x15;
const BPF_JGT_K: u16 = 0x25;
const BPF_JGE_K: u16 = 0x35;
const BPF_JA: u16 = 0x05;
const BPF_RET_K: u16 = 0x06;
const BPF_AND_K: u16 = 0x54;
const MAX_INSNS: usize = 4096;

/// Offsets in `struct seccomp_data`.
const OFFSET_NR: u32 = 0;
const OFFSET_ARCH: u32 = 4;
const fn arg_low(index: u8) -> u32 {
    16 + 8 * index as u32
}
const fn arg_high(index: u8) -> u32 {
    arg_low(index) + 4
}

/// x32 syscall numbers have this bit set; they never match the native table.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// `SECCOMP_RET_*` values.
pub mod ret {
    pub const ALLOW: u32 = 0x7fff_0000;
    pub const LOG: u32 = 0x7ffc_0000;
    pub const TRAP: u32 = 0x0003_0000;
    pub const KILL_THREAD: u32 = 0;
    pub const KILL_PROCESS: u32 = 0x8000_0000;
    pub const fn errno(errno: u32) -> u32 {
        0x0005_0000 | (errno & 0xffff)
    }
    pub const fn trace(data: u32) -> u32 {
        0x7ff0_0000 | (data & 0xffff)
    }
}

/// A comparison of one 64-bit syscall argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmp {
    Eq(u64),
    Ne(u64),
    Lt(u64),
    Le(u64),
    Gt(u64),
    Ge(u64),
    /// `(arg & mask) == value`.
    MaskedEq {
        mask: u64,
        value: u64,
    },
}

/// A condition on argument `index`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Condition {
    pub index: u8,
    pub cmp: Cmp,
}

/// All conditions hold ⇒ `action`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub conditions: Vec<Condition>,
    pub action: u32,
}

/// Rules per syscall number, tried in order; the first that matches decides.
#[derive(Clone, Debug)]
pub struct Program {
    pub audit_arch: u32,
    pub default_action: u32,
    pub syscalls: Vec<(u32, Vec<Rule>)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Label(usize);

enum Item {
    Insn(SockFilter),
    /// `if A <op> k goto t else goto f`, as `jop k,0,1; ja t; ja f`.
    Branch {
        code: u16,
        k: u32,
        t: Label,
        f: Label,
    },
    Goto(Label),
    Mark(Label),
}

#[derive(Default)]
struct Asm {
    items: Vec<Item>,
    labels: usize,
}

impl Asm {
    fn label(&mut self) -> Label {
        self.labels += 1;
        Label(self.labels - 1)
    }

    fn mark(&mut self, label: Label) {
        self.items.push(Item::Mark(label));
    }

    fn load(&mut self, offset: u32) {
        self.items.push(Item::Insn(SockFilter {
            code: BPF_LD_W_ABS,
            jt: 0,
            jf: 0,
            k: offset,
        }));
    }

    fn and(&mut self, mask: u32) {
        self.items.push(Item::Insn(SockFilter {
            code: BPF_AND_K,
            jt: 0,
            jf: 0,
            k: mask,
        }));
    }

    fn ret(&mut self, value: u32) {
        self.items.push(Item::Insn(SockFilter {
            code: BPF_RET_K,
            jt: 0,
            jf: 0,
            k: value,
        }));
    }

    fn branch(&mut self, code: u16, k: u32, t: Label, f: Label) {
        self.items.push(Item::Branch { code, k, t, f });
    }

    fn goto(&mut self, target: Label) {
        self.items.push(Item::Goto(target));
    }

    /// Lays the program out, using one-instruction conditional jumps where both targets
    /// are within 255 instructions and `jcond 0,1; ja t; ja f` elsewhere (branch
    /// relaxation: lengthening one branch can push others out of range, so repeat).
    fn assemble(self) -> Result<Vec<SockFilter>, BpfError> {
        let mut long = vec![false; self.items.len()];
        let mut positions = vec![0usize; self.labels];
        let mut starts = vec![0usize; self.items.len()];
        let total = loop {
            let mut pc = 0usize;
            for (i, item) in self.items.iter().enumerate() {
                starts[i] = pc;
                match item {
                    Item::Mark(label) => positions[label.0] = pc,
                    Item::Insn(_) | Item::Goto(_) => pc += 1,
                    Item::Branch { .. } => pc += if long[i] { 3 } else { 1 },
                }
            }
            let mut changed = false;
            for (i, item) in self.items.iter().enumerate() {
                if let Item::Branch { t, f, .. } = item {
                    let next = starts[i] + 1;
                    let fits = |l: &Label| positions[l.0] >= next && positions[l.0] - next <= 255;
                    let in_range = fits(t) && fits(f);
                    if !long[i] && !in_range {
                        long[i] = true;
                        changed = true;
                    }
                }
            }
            if !changed {
                break pc;
            }
        };
        if total > MAX_INSNS {
            return Err(BpfError::TooLong(total));
        }
        // Every target is later in the program: trees, groups and rule blocks come after
        // the branches that reach them.
        let offset = |from: usize, to: Label| -> u32 {
            u32::try_from(positions[to.0].saturating_sub(from + 1)).unwrap_or(u32::MAX)
        };
        let mut out = Vec::with_capacity(total);
        for (i, item) in self.items.into_iter().enumerate() {
            match item {
                Item::Mark(_) => {}
                Item::Insn(insn) => out.push(insn),
                Item::Goto(target) => {
                    let here = out.len();
                    out.push(SockFilter {
                        code: BPF_JA,
                        jt: 0,
                        jf: 0,
                        k: offset(here, target),
                    });
                }
                Item::Branch { code, k, t, f } if !long[i] => {
                    let here = out.len();
                    out.push(SockFilter {
                        code,
                        jt: u8::try_from(offset(here, t)).unwrap_or(u8::MAX),
                        jf: u8::try_from(offset(here, f)).unwrap_or(u8::MAX),
                        k,
                    });
                }
                Item::Branch { code, k, t, f } => {
                    out.push(SockFilter {
                        code,
                        jt: 0,
                        jf: 1,
                        k,
                    });
                    let here = out.len();
                    out.push(SockFilter {
                        code: BPF_JA,
                        jt: 0,
                        jf: 0,
                        k: offset(here, t),
                    });
                    out.push(SockFilter {
                        code: BPF_JA,
                        jt: 0,
                        jf: 0,
                        k: offset(here + 1, f),
                    });
                }
            }
        }
        Ok(out)
    }
}

fn high(v: u64) -> u32 {
    (v >> 32) as u32
}

fn low(v: u64) -> u32 {
    v as u32
}

/// Emits a 64-bit comparison jumping to `ok` or `fail`.
fn emit_condition(asm: &mut Asm, c: Condition, ok: Label, fail: Label) {
    let next = asm.label();
    match c.cmp {
        Cmp::Eq(v) | Cmp::Ne(v) => {
            let (t, f) = if matches!(c.cmp, Cmp::Eq(_)) {
                (ok, fail)
            } else {
                (fail, ok)
            };
            asm.load(arg_high(c.index));
            asm.branch(BPF_JEQ_K, high(v), next, f);
            asm.mark(next);
            asm.load(arg_low(c.index));
            asm.branch(BPF_JEQ_K, low(v), t, f);
        }
        Cmp::MaskedEq { mask, value } => {
            asm.load(arg_high(c.index));
            asm.and(high(mask));
            asm.branch(BPF_JEQ_K, high(value), next, fail);
            asm.mark(next);
            asm.load(arg_low(c.index));
            asm.and(low(mask));
            asm.branch(BPF_JEQ_K, low(value), ok, fail);
        }
        Cmp::Gt(v) | Cmp::Ge(v) | Cmp::Lt(v) | Cmp::Le(v) => {
            // Unsigned 64-bit: decide on the high word unless it is equal.
            let greater_is_true = matches!(c.cmp, Cmp::Gt(_) | Cmp::Ge(_));
            let (if_greater, if_less) = if greater_is_true {
                (ok, fail)
            } else {
                (fail, ok)
            };
            let equal_high = asm.label();
            let not_greater = asm.label();
            asm.load(arg_high(c.index));
            asm.branch(BPF_JGT_K, high(v), if_greater, not_greater);
            asm.mark(not_greater);
            asm.branch(BPF_JEQ_K, high(v), equal_high, if_less);
            asm.mark(equal_high);
            asm.load(arg_low(c.index));
            match c.cmp {
                Cmp::Gt(_) => asm.branch(BPF_JGT_K, low(v), ok, fail),
                Cmp::Ge(_) => asm.branch(BPF_JGE_K, low(v), ok, fail),
                // a < v  ⇔  !(a >= v);  a <= v  ⇔  !(a > v)
                Cmp::Lt(_) => asm.branch(BPF_JGE_K, low(v), fail, ok),
                _ => asm.branch(BPF_JGT_K, low(v), fail, ok),
            }
        }
    }
}

/// Emits the rule block of one syscall (the syscall number is known to match).
fn emit_rules(asm: &mut Asm, rules: &[Rule], default: Label) {
    for rule in rules {
        if rule.conditions.is_empty() {
            asm.ret(rule.action);
            return;
        }
        let next_rule = asm.label();
        for (i, condition) in rule.conditions.iter().enumerate() {
            let ok = asm.label();
            emit_condition(asm, *condition, ok, next_rule);
            asm.mark(ok);
            if i + 1 == rule.conditions.len() {
                asm.ret(rule.action);
            }
        }
        asm.mark(next_rule);
    }
    asm.goto(default);
}

/// Emits a binary search over `syscalls` (sorted by number). Each leaf group compares
/// numbers one by one and is followed by its rule blocks, so its jumps stay short; the
/// unconditional blocks of a group share one `ret` per action.
fn emit_tree(asm: &mut Asm, syscalls: &[(u32, Vec<Rule>)], default: Label) {
    if syscalls.len() <= 8 {
        let mut shared: Vec<(u32, Label)> = Vec::new();
        let mut blocks: Vec<(Label, &[Rule])> = Vec::new();
        for (nr, rules) in syscalls {
            let target = match rules.as_slice() {
                [rule] if rule.conditions.is_empty() => {
                    match shared.iter().find(|(action, _)| *action == rule.action) {
                        Some((_, label)) => *label,
                        None => {
                            let label = asm.label();
                            shared.push((rule.action, label));
                            label
                        }
                    }
                }
                _ => {
                    let label = asm.label();
                    blocks.push((label, rules));
                    label
                }
            };
            let next = asm.label();
            asm.branch(BPF_JEQ_K, *nr, target, next);
            asm.mark(next);
        }
        asm.goto(default);
        for (action, label) in shared {
            asm.mark(label);
            asm.ret(action);
        }
        for (label, rules) in blocks {
            asm.mark(label);
            emit_rules(asm, rules, default);
        }
        return;
    }
    let mid = syscalls.len() / 2;
    let (left, right) = (asm.label(), asm.label());
    asm.branch(BPF_JGE_K, syscalls[mid].0, right, left);
    asm.mark(left);
    emit_tree(asm, &syscalls[..mid], default);
    asm.mark(right);
    emit_tree(asm, &syscalls[mid..], default);
}

/// Assembles `program` into instructions for `seccomp(SECCOMP_SET_MODE_FILTER)`.
pub fn compile(program: &Program) -> Result<Vec<SockFilter>, BpfError> {
    let mut syscalls = program.syscalls.clone();
    syscalls.sort_by_key(|(nr, _)| *nr);
    syscalls.dedup_by(|b, a| {
        if a.0 == b.0 {
            a.1.append(&mut b.1);
            true
        } else {
            false
        }
    });
    let mut asm = Asm::default();
    let (default, native, tree) = (asm.label(), asm.label(), asm.label());
    asm.load(OFFSET_ARCH);
    asm.branch(BPF_JEQ_K, program.audit_arch, native, default);
    asm.mark(native);
    asm.load(OFFSET_NR);
    asm.branch(BPF_JGE_K, X32_SYSCALL_BIT, default, tree);
    asm.mark(tree);
    emit_tree(&mut asm, &syscalls, default);
    asm.mark(default);
    asm.ret(program.default_action);
    asm.assemble()
}

/// Runs `filter` on a syscall like the kernel does (for tests).
pub fn evaluate(filter: &[SockFilter], arch: u32, nr: u32, args: [u64; 6]) -> u32 {
    let mut data = [0u8; 64];
    data[0..4].copy_from_slice(&nr.to_ne_bytes());
    data[4..8].copy_from_slice(&arch.to_ne_bytes());
    for (i, a) in args.iter().enumerate() {
        data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_ne_bytes());
    }
    let word = |k: u32| -> u32 {
        let k = k as usize;
        u32::from_ne_bytes([data[k], data[k + 1], data[k + 2], data[k + 3]])
    };
    let (mut pc, mut a) = (0usize, 0u32);
    while let Some(insn) = filter.get(pc) {
        pc += 1;
        match insn.code {
            BPF_LD_W_ABS => a = word(insn.k),
            BPF_AND_K => a &= insn.k,
            BPF_RET_K => return insn.k,
            BPF_JA => pc += insn.k as usize,
            code => {
                let taken = match code {
                    BPF_JEQ_K => a == insn.k,
                    BPF_JGT_K => a > insn.k,
                    BPF_JGE_K => a >= insn.k,
                    _ => return ret::KILL_PROCESS,
                };
                pc += usize::from(if taken { insn.jt } else { insn.jf });
            }
        }
    }
    ret::KILL_PROCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    const ARCH: u32 = 0xc000_003e;
    const EPERM: u32 = ret::errno(1);

    fn program(syscalls: Vec<(u32, Vec<Rule>)>) -> Vec<SockFilter> {
        compile(&Program {
            audit_arch: ARCH,
            default_action: EPERM,
            syscalls,
        })
        .unwrap()
    }

    fn allow() -> Vec<Rule> {
        vec![Rule {
            conditions: vec![],
            action: ret::ALLOW,
        }]
    }

    #[test]
    fn search_tree_allows_listed_numbers_only() {
        let listed: Vec<u32> = (0..600).filter(|n| n % 3 == 0).collect();
        let filter = program(listed.iter().map(|n| (*n, allow())).collect());
        for nr in 0..610 {
            let want = if nr % 3 == 0 && nr < 600 {
                ret::ALLOW
            } else {
                EPERM
            };
            assert_eq!(evaluate(&filter, ARCH, nr, [0; 6]), want, "nr {nr}");
        }
    }

    #[test]
    fn foreign_arch_and_x32_numbers_get_the_default() {
        let filter = program(vec![(1, allow())]);
        assert_eq!(evaluate(&filter, 0x4000_0003, 1, [0; 6]), EPERM);
        assert_eq!(evaluate(&filter, ARCH, X32_SYSCALL_BIT | 1, [0; 6]), EPERM);
        assert_eq!(evaluate(&filter, ARCH, 1, [0; 6]), ret::ALLOW);
    }

    #[test]
    fn argument_comparisons_are_64_bit() {
        let rule = |cmp| Rule {
            conditions: vec![Condition { index: 2, cmp }],
            action: ret::ALLOW,
        };
        let cases: Vec<(Cmp, Vec<(u64, bool)>)> = vec![
            (
                Cmp::Eq(0x1_0000_0005),
                vec![(0x1_0000_0005, true), (5, false), (0x1_0000_0006, false)],
            ),
            (
                Cmp::Ne(7),
                vec![(7, false), (8, true), (0x1_0000_0007, true)],
            ),
            (
                Cmp::Gt(0x1_0000_0000),
                vec![
                    (0x1_0000_0001, true),
                    (0x1_0000_0000, false),
                    (u64::MAX, true),
                    (5, false),
                ],
            ),
            (
                Cmp::Ge(10),
                vec![(10, true), (9, false), (0x2_0000_0000, true)],
            ),
            (
                Cmp::Lt(10),
                vec![(9, true), (10, false), (0x1_0000_0001, false)],
            ),
            (
                Cmp::Le(0x1_0000_0000),
                vec![
                    (0x1_0000_0000, true),
                    (0xffff_ffff, true),
                    (0x1_0000_0001, false),
                ],
            ),
            (
                Cmp::MaskedEq {
                    mask: 0x7E02_0000,
                    value: 0,
                },
                vec![
                    (0x0000_0011, true),
                    (0x1000_0000, false),
                    (0x0200_0000 | 0x11, false),
                ],
            ),
        ];
        for (cmp, values) in cases {
            let filter = program(vec![(56, vec![rule(cmp)])]);
            for (value, allowed) in values {
                let mut args = [0u64; 6];
                args[2] = value;
                let got = evaluate(&filter, ARCH, 56, args);
                assert_eq!(got == ret::ALLOW, allowed, "{cmp:?} with {value:#x}");
            }
        }
    }

    #[test]
    fn rules_are_tried_in_order_and_actions_differ_per_syscall() {
        let filter = program(vec![
            (
                435,
                vec![Rule {
                    conditions: vec![],
                    action: ret::errno(38),
                }],
            ),
            (
                135,
                (0..3)
                    .map(|v| Rule {
                        conditions: vec![Condition {
                            index: 0,
                            cmp: Cmp::Eq(v),
                        }],
                        action: ret::ALLOW,
                    })
                    .collect(),
            ),
        ]);
        assert_eq!(evaluate(&filter, ARCH, 435, [0; 6]), ret::errno(38));
        for v in 0..3 {
            assert_eq!(evaluate(&filter, ARCH, 135, [v, 0, 0, 0, 0, 0]), ret::ALLOW);
        }
        assert_eq!(evaluate(&filter, ARCH, 135, [3, 0, 0, 0, 0, 0]), EPERM);
    }

    #[test]
    fn too_long_programs_are_refused() {
        let many: Vec<(u32, Vec<Rule>)> = (0..5000).map(|n| (n, allow())).collect();
        assert!(matches!(
            compile(&Program {
                audit_arch: ARCH,
                default_action: EPERM,
                syscalls: many
            }),
            Err(BpfError::TooLong(_))
        ));
    }
}
