//! A compact compilation of a profile, checked against libseccomp's.
//!
//! libseccomp emits one comparison per syscall and ABI (≈1200 instructions for the default
//! profile over x86_64, x86 and x32), and the kernel converts and JIT-compiles every
//! instruction each time a step installs the filter: ≈0.4 ms a step, on its critical path.
//! Here the syscalls one action covers are a bitmap: one word per 32 syscall numbers,
//! tested with `jset` after a binary search over the words (≈3 instructions per 32
//! numbers); the few syscalls with another action or with argument conditions are
//! matched one by one before it. The same decisions take ≈260 instructions.
//!
//! libseccomp stays the reference: [`compile`] builds only profiles whose meaning is plain
//! (per syscall one action; conditional rules of one action are alternatives, an
//! unconditional rule of that action wins), and the crate keeps the compact program only
//! if it decides every probe of [`probes`] — every syscall number of every ABI, the
//! profile's constants in the arguments, foreign architectures — as libseccomp's does.

use std::collections::{BTreeMap, BTreeSet};

use libseccomp::{ScmpAction, ScmpArch, ScmpSyscall};
use oci_spec::runtime::{LinuxSeccomp, LinuxSeccompArg, LinuxSeccompOperator};

use crate::bpf::{
    AND_K, ARCH, ARGS, Assembler, JEQ_K, JGE_K, JGT_K, JSET_K, LD_IMM, LD_W_ABS, LSH_X, Label, NR,
    RET_K, RET_KILL_THREAD, SeccompData, SockFilter, TAX, TXA,
};

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const AUDIT_ARCH_I386: u32 = 0x4000_0003;
/// x32 syscalls share x86_64's audit architecture and set this bit in their number.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
/// Bitmaps cover at most this many syscall numbers above an ABI's first; numbers past it
/// (none on the x86 ABIs) are matched one by one.
const BITMAP_SPAN: u32 = 4096;

/// x86's multiplexers: `socketcall(call, args)` and `ipc(call, ...)`, and the calls they
/// reach. A rule on one of these calls also allows it through its multiplexer (libseccomp
/// adds `multiplexer(arg0 == call)`), whether or not the ABI has a syscall of its own.
const X86_SOCKETCALL: u32 = 102;
const X86_IPC: u32 = 117;
const MULTIPLEXED: [(&str, u32, u32); 32] = [
    ("socket", X86_SOCKETCALL, 1),
    ("bind", X86_SOCKETCALL, 2),
    ("connect", X86_SOCKETCALL, 3),
    ("listen", X86_SOCKETCALL, 4),
    ("accept", X86_SOCKETCALL, 5),
    ("getsockname", X86_SOCKETCALL, 6),
    ("getpeername", X86_SOCKETCALL, 7),
    ("socketpair", X86_SOCKETCALL, 8),
    ("send", X86_SOCKETCALL, 9),
    ("recv", X86_SOCKETCALL, 10),
    ("sendto", X86_SOCKETCALL, 11),
    ("recvfrom", X86_SOCKETCALL, 12),
    ("shutdown", X86_SOCKETCALL, 13),
    ("setsockopt", X86_SOCKETCALL, 14),
    ("getsockopt", X86_SOCKETCALL, 15),
    ("sendmsg", X86_SOCKETCALL, 16),
    ("recvmsg", X86_SOCKETCALL, 17),
    ("accept4", X86_SOCKETCALL, 18),
    ("recvmmsg", X86_SOCKETCALL, 19),
    ("sendmmsg", X86_SOCKETCALL, 20),
    ("semop", X86_IPC, 1),
    ("semget", X86_IPC, 2),
    ("semctl", X86_IPC, 3),
    ("semtimedop", X86_IPC, 4),
    ("msgsnd", X86_IPC, 11),
    ("msgrcv", X86_IPC, 12),
    ("msgget", X86_IPC, 13),
    ("msgctl", X86_IPC, 14),
    ("shmat", X86_IPC, 21),
    ("shmdt", X86_IPC, 22),
    ("shmget", X86_IPC, 23),
    ("shmctl", X86_IPC, 24),
];

/// One comparison of a 64-bit syscall argument, as libseccomp defines it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Condition {
    index: u32,
    op: Op,
    value: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Ge,
    Gt,
    /// `(arg & mask) == value`.
    MaskedEq(u64),
}

/// What the profile decides for one syscall number of one ABI.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    Return(u32),
    /// `ret` when any rule's conditions all hold, else the default action.
    Conditional {
        ret: u32,
        rules: Vec<Vec<Condition>>,
    },
}

/// An ABI's slice of the filter: its audit architecture, the syscall numbers it owns
/// (`[low, high]`), how wide its arguments are to libseccomp, and its decisions.
struct Abi {
    audit_arch: u32,
    low: u32,
    high: u32,
    wide_args: bool,
    outcomes: BTreeMap<u32, Outcome>,
}

/// The compact program of `profile`, or `None` when the profile is outside what this
/// compiler models (then libseccomp's program is used). Profiles libseccomp refuses are
/// refused there first.
pub(crate) fn compile(profile: &LinuxSeccomp) -> Option<(Vec<SockFilter>, Vec<SeccompData>)> {
    let default = ret_value(profile.default_action(), profile.default_errno_ret())?;
    let mut arches = vec![ScmpArch::native()];
    for arch in profile.architectures().iter().flatten() {
        let arch = crate::arch(*arch).ok()?;
        if !arches.contains(&arch) {
            arches.push(arch);
        }
    }
    let abis = arches
        .iter()
        .map(|arch| abi(profile, *arch, default))
        .collect::<Option<Vec<_>>>()?;
    let program = emit(&abis, default).ok()?;
    Some((program, probes(&abis)))
}

fn ret_value(action: oci_spec::runtime::LinuxSeccompAction, errno: Option<u32>) -> Option<u32> {
    Some(match crate::action(action, errno).ok()? {
        ScmpAction::Allow => 0x7fff_0000,
        ScmpAction::Errno(e) => 0x0005_0000 | (e as u32 & 0xffff),
        ScmpAction::KillThread => RET_KILL_THREAD,
        ScmpAction::KillProcess => 0x8000_0000,
        ScmpAction::Trap => 0x0003_0000,
        ScmpAction::Log => 0x7ffc_0000,
        ScmpAction::Trace(data) => 0x7ff0_0000 | u32::from(data),
        _ => return None,
    })
}

fn abi(profile: &LinuxSeccomp, arch: ScmpArch, default: u32) -> Option<Abi> {
    let (audit_arch, low, high, wide_args) = match arch {
        ScmpArch::X8664 => (AUDIT_ARCH_X86_64, 0, X32_SYSCALL_BIT - 1, true),
        ScmpArch::X32 => (AUDIT_ARCH_X86_64, X32_SYSCALL_BIT, u32::MAX, false),
        ScmpArch::X86 => (AUDIT_ARCH_I386, 0, u32::MAX, false),
        _ => return None,
    };
    let mut outcomes = BTreeMap::new();
    let mut direct = None;
    for entry in profile.syscalls().iter().flatten() {
        let ret = ret_value(entry.action(), entry.errno_ret())?;
        if ret == default {
            continue;
        }
        let conditions = entry
            .args()
            .iter()
            .flatten()
            .map(condition)
            .collect::<Option<Vec<_>>>()?;
        for name in entry.names() {
            let Ok(syscall) = ScmpSyscall::from_name_by_arch(name, arch) else {
                continue;
            };
            let multiplexed = MULTIPLEXED.iter().find(|(call, ..)| call == name);
            let mut nr = syscall.as_raw_syscall();
            if let (ScmpArch::X86, Some((_, multiplexer, call))) = (arch, multiplexed) {
                // The call's own arguments are behind a pointer there: conditions on them
                // are not modelled.
                if !conditions.is_empty() {
                    return None;
                }
                let selector = Condition {
                    index: 0,
                    op: Op::Eq,
                    value: u64::from(*call),
                };
                add_rule(&mut outcomes, *multiplexer, ret, vec![selector])?;
                // The name resolves to a placeholder; the call's own syscall, where the
                // ABI has one, is the number libseccomp names after it.
                nr = direct
                    .get_or_insert_with(|| numbers_by_name(arch))
                    .get(name.as_str())
                    .copied()
                    .unwrap_or(-1);
            }
            // A negative number is libseccomp's placeholder for a call this ABI lacks.
            let Ok(nr) = u32::try_from(nr) else {
                continue;
            };
            if !(low..=high).contains(&nr) {
                return None;
            }
            add_rule(&mut outcomes, nr, ret, conditions.clone())?;
        }
    }
    Some(Abi {
        audit_arch,
        low,
        high,
        wide_args,
        outcomes,
    })
}

/// The syscall numbers libseccomp knows on `arch` (below 1024), by name.
fn numbers_by_name(arch: ScmpArch) -> BTreeMap<String, i32> {
    (0..1024)
        .filter_map(|nr| {
            let name = ScmpSyscall::from_raw_syscall(nr)
                .get_name_by_arch(arch)
                .ok()?;
            Some((name, nr))
        })
        .collect()
}

/// Adds a rule to what `nr` decides; `None` when it gives one syscall two actions
/// (libseccomp's precedence between them is not modelled).
fn add_rule(
    outcomes: &mut BTreeMap<u32, Outcome>,
    nr: u32,
    ret: u32,
    conditions: Vec<Condition>,
) -> Option<()> {
    let merged = match (outcomes.remove(&nr), conditions.is_empty()) {
        (None, true) => Outcome::Return(ret),
        (None, false) => Outcome::Conditional {
            ret,
            rules: vec![conditions],
        },
        // An unconditional rule makes the conditional ones of its action moot.
        (Some(Outcome::Return(r)), _) if r == ret => Outcome::Return(ret),
        (Some(Outcome::Conditional { ret: r, .. }), true) if r == ret => Outcome::Return(ret),
        (Some(Outcome::Conditional { ret: r, mut rules }), false) if r == ret => {
            rules.push(conditions);
            Outcome::Conditional { ret, rules }
        }
        (Some(_), _) => return None,
    };
    outcomes.insert(nr, merged);
    Some(())
}

fn condition(arg: &LinuxSeccompArg) -> Option<Condition> {
    let index = u32::try_from(arg.index()).ok().filter(|i| *i < 6)?;
    let (op, value) = match arg.op() {
        LinuxSeccompOperator::ScmpCmpEq => (Op::Eq, arg.value()),
        LinuxSeccompOperator::ScmpCmpNe => (Op::Ne, arg.value()),
        LinuxSeccompOperator::ScmpCmpLt => (Op::Lt, arg.value()),
        LinuxSeccompOperator::ScmpCmpLe => (Op::Le, arg.value()),
        LinuxSeccompOperator::ScmpCmpGe => (Op::Ge, arg.value()),
        LinuxSeccompOperator::ScmpCmpGt => (Op::Gt, arg.value()),
        LinuxSeccompOperator::ScmpCmpMaskedEq => {
            (Op::MaskedEq(arg.value()), arg.value_two().unwrap_or(0))
        }
    };
    Some(Condition { index, op, value })
}

/// A stretch of syscall numbers decided alike: one return, or a 32-number bitmap word
/// (set bits take the bitmap's action, clear ones the default).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Segment {
    Uniform(bool),
    Word(u32),
}

fn emit(abis: &[Abi], default: u32) -> Result<Vec<SockFilter>, crate::bpf::Unencodable> {
    let mut asm = Assembler::default();
    let audit_arches: BTreeSet<u32> = abis.iter().map(|a| a.audit_arch).collect();
    // x86_64 first: the native ABI is the common case.
    let mut order: Vec<u32> = audit_arches.into_iter().collect();
    order.sort_by_key(|a| *a != AUDIT_ARCH_X86_64);
    let entries: Vec<Label> = order.iter().map(|_| asm.label()).collect();

    asm.stmt(LD_W_ABS, ARCH);
    for (audit_arch, entry) in order.iter().zip(&entries) {
        let next = asm.label();
        asm.jump(JEQ_K, *audit_arch, *entry, next);
        asm.bind(next);
    }
    // Another architecture: kill, as libseccomp's default bad-architecture action does.
    asm.stmt(RET_K, RET_KILL_THREAD);

    for (audit_arch, entry) in order.iter().zip(&entries) {
        asm.bind(*entry);
        asm.stmt(LD_W_ABS, NR);
        let mine: Vec<&Abi> = abis
            .iter()
            .filter(|a| a.audit_arch == *audit_arch)
            .collect();
        if *audit_arch == AUDIT_ARCH_X86_64 {
            // One audit architecture, two ABIs split by the x32 bit; a missing one's
            // numbers count as a foreign architecture's.
            let native = mine.iter().find(|a| a.low == 0);
            let x32 = mine.iter().find(|a| a.low == X32_SYSCALL_BIT);
            let (high, low) = (asm.label(), asm.label());
            asm.jump(JGE_K, X32_SYSCALL_BIT, high, low);
            asm.bind(low);
            match native {
                Some(abi) => emit_abi(&mut asm, abi, default),
                None => asm.stmt(RET_K, RET_KILL_THREAD),
            }
            asm.bind(high);
            match x32 {
                Some(abi) => emit_abi(&mut asm, abi, default),
                None => {
                    // Except -1 (a tracer's skipped syscall), which libseccomp leaves to
                    // the default action.
                    let (minus_one, other) = (asm.label(), asm.label());
                    asm.jump(JEQ_K, u32::MAX, minus_one, other);
                    asm.bind(other);
                    asm.stmt(RET_K, RET_KILL_THREAD);
                    asm.bind(minus_one);
                    asm.stmt(RET_K, default);
                }
            }
        } else {
            for abi in mine {
                emit_abi(&mut asm, abi, default);
            }
        }
    }
    let program = asm.finish()?;
    if program.len() > crate::bpf::MAX_INSNS {
        return Err(crate::bpf::Unencodable);
    }
    Ok(program)
}

/// One ABI's decisions, with the syscall number in A.
fn emit_abi(asm: &mut Assembler, abi: &Abi, default: u32) {
    // The bitmap's action: the commonest unconditional one.
    let mut counts: BTreeMap<u32, usize> = BTreeMap::new();
    for outcome in abi.outcomes.values() {
        if let Outcome::Return(ret) = outcome {
            *counts.entry(*ret).or_default() += 1;
        }
    }
    let bitmap_ret = counts
        .iter()
        .max_by_key(|(ret, count)| (**count, std::cmp::Reverse(**ret)))
        .map(|(ret, _)| *ret);
    let span_end = abi.low.saturating_add(BITMAP_SPAN).min(abi.high);
    let in_bitmap = |nr: u32, outcome: &Outcome| {
        nr < span_end && Some(outcome) == bitmap_ret.map(Outcome::Return).as_ref()
    };
    let singles: Vec<(u32, &Outcome, Label)> = abi
        .outcomes
        .iter()
        .filter(|(nr, outcome)| !in_bitmap(**nr, outcome))
        .map(|(nr, outcome)| (*nr, outcome, asm.label()))
        .collect();
    for (nr, _, body) in &singles {
        let next = asm.label();
        asm.jump(JEQ_K, *nr, *body, next);
        asm.bind(next);
    }
    let (yes, no) = (asm.label(), asm.label());
    if let Some(ret) = bitmap_ret {
        let bits: Vec<u32> = abi
            .outcomes
            .iter()
            .filter(|(nr, outcome)| in_bitmap(**nr, outcome))
            .map(|(nr, _)| nr - abi.low)
            .collect();
        let words = bits.last().map_or(0, |last| last / 32 + 1);
        let mut segments: Vec<(u32, Segment)> = Vec::new();
        for word in 0..words {
            let mask = bits
                .iter()
                .filter(|b| **b / 32 == word)
                .fold(0u32, |m, b| m | 1 << (b % 32));
            let segment = match mask {
                0 => Segment::Uniform(false),
                u32::MAX => Segment::Uniform(true),
                m => Segment::Word(m),
            };
            let continues = matches!(
                (segments.last(), segment),
                (Some((_, Segment::Uniform(a))), Segment::Uniform(b)) if *a == b
            );
            if !continues {
                segments.push((abi.low + word * 32, segment));
            }
        }
        let past = asm.label();
        asm.jump(JGE_K, abi.low + words * 32, no, past);
        asm.bind(past);
        load_bit_of_number(asm);
        search(asm, &segments, yes, no);
        asm.bind(yes);
        asm.stmt(RET_K, ret);
    }
    asm.bind(no);
    asm.stmt(RET_K, default);
    for (_, outcome, body) in singles {
        asm.bind(body);
        match outcome {
            Outcome::Return(ret) => asm.stmt(RET_K, *ret),
            Outcome::Conditional { ret, rules } => {
                if let Some((index, high, values)) = alternatives(rules, abi.wide_args) {
                    emit_alternatives(asm, index, high, &values, *ret, default);
                    continue;
                }
                for rule in rules {
                    let fail = asm.label();
                    for condition in rule {
                        emit_condition(asm, condition, abi.wide_args, fail);
                    }
                    asm.stmt(RET_K, *ret);
                    asm.bind(fail);
                }
                asm.stmt(RET_K, default);
            }
        }
    }
}

/// When every rule is one equality on the same argument, with the same high word on a
/// wide ABI (a selector: `personality`'s personas, a multiplexer's calls): that argument,
/// that high word and the low words it may have.
fn alternatives(rules: &[Vec<Condition>], wide: bool) -> Option<(u32, Option<u32>, Vec<u32>)> {
    let first = rules.first()?.first()?;
    let high = wide.then_some((first.value >> 32) as u32);
    let mut values = Vec::new();
    for rule in rules {
        match rule.as_slice() {
            [c] if c.op == Op::Eq
                && c.index == first.index
                && (!wide || (c.value >> 32) as u32 == high?) =>
            {
                values.push(c.value as u32);
            }
            _ => return None,
        }
    }
    Some((first.index, high, values))
}

/// `ret` when the argument is one of the alternatives, else `default`: one comparison each.
fn emit_alternatives(
    asm: &mut Assembler,
    index: u32,
    high: Option<u32>,
    values: &[u32],
    ret: u32,
    default: u32,
) {
    let (pass, fail) = (asm.label(), asm.label());
    let low_word = ARGS + 8 * index;
    if let Some(high) = high {
        let next = asm.label();
        asm.stmt(LD_W_ABS, low_word + 4);
        asm.jump(JEQ_K, high, next, fail);
        asm.bind(next);
    }
    asm.stmt(LD_W_ABS, low_word);
    for value in values {
        let next = asm.label();
        asm.jump(JEQ_K, *value, pass, next);
        asm.bind(next);
    }
    asm.bind(fail);
    asm.stmt(RET_K, default);
    asm.bind(pass);
    asm.stmt(RET_K, ret);
}

/// With the syscall number in A: X = 1 << (nr % 32), the number's bit in its bitmap word,
/// and A the number again.
fn load_bit_of_number(asm: &mut Assembler) {
    asm.stmt(AND_K, 31);
    asm.stmt(TAX, 0);
    asm.stmt(LD_IMM, 1);
    asm.stmt(LSH_X, 0);
    asm.stmt(TAX, 0);
    asm.stmt(LD_W_ABS, NR);
}

/// A binary search over `segments` (sorted by first number, A the syscall number, X its
/// bit) ending in `yes` or `no`.
fn search(asm: &mut Assembler, segments: &[(u32, Segment)], yes: Label, no: Label) {
    match segments {
        [] => asm.always(no),
        [(_, Segment::Uniform(set))] => asm.always(if *set { yes } else { no }),
        [(_, Segment::Word(mask))] => {
            asm.stmt(TXA, 0);
            asm.jump(JSET_K, *mask, yes, no);
        }
        _ => {
            let middle = segments.len() / 2;
            let (left, right) = (asm.label(), asm.label());
            asm.jump(JGE_K, segments[middle].0, right, left);
            asm.bind(left);
            search(asm, &segments[..middle], yes, no);
            asm.bind(right);
            search(asm, &segments[middle..], yes, no);
        }
    }
}

/// Falls through when `condition` holds, else jumps to `fail`. libseccomp compares only
/// the low word on ABIs it deems 32-bit.
fn emit_condition(asm: &mut Assembler, condition: &Condition, wide: bool, fail: Label) {
    let low_word = ARGS + 8 * condition.index;
    let (value_high, value_low) = ((condition.value >> 32) as u32, condition.value as u32);
    let pass = asm.label();
    // Compares one word with `jump` (taken = holds for jeq/jgt/jge), `negate` flipping it.
    let word = |asm: &mut Assembler, offset: u32, mask: Option<u32>, code, k, t, f| {
        asm.stmt(LD_W_ABS, offset);
        if let Some(mask) = mask {
            asm.stmt(AND_K, mask);
        }
        asm.jump(code, k, t, f);
    };
    let masks = match condition.op {
        Op::MaskedEq(mask) => (Some((mask >> 32) as u32), Some(mask as u32)),
        _ => (None, None),
    };
    // For each op: the high-word step (when wide), then the low-word step.
    match condition.op {
        Op::Eq | Op::MaskedEq(_) | Op::Ne => {
            let (t_low, f_low) = if condition.op == Op::Ne {
                (fail, pass)
            } else {
                (pass, fail)
            };
            if wide {
                let next = asm.label();
                let differs = if condition.op == Op::Ne { pass } else { fail };
                word(asm, low_word + 4, masks.0, JEQ_K, value_high, next, differs);
                asm.bind(next);
            }
            word(asm, low_word, masks.1, JEQ_K, value_low, t_low, f_low);
        }
        Op::Gt | Op::Ge | Op::Lt | Op::Le => {
            // a > v (or >=) as (hi > vhi) || (hi == vhi && lo > vlo); < and <= negate it.
            let holds_if_greater = matches!(condition.op, Op::Gt | Op::Ge);
            let (greater, not_greater) = if holds_if_greater {
                (pass, fail)
            } else {
                (fail, pass)
            };
            if wide {
                let (equal_high, check_equal) = (asm.label(), asm.label());
                word(
                    asm,
                    low_word + 4,
                    None,
                    JGT_K,
                    value_high,
                    greater,
                    check_equal,
                );
                asm.bind(check_equal);
                asm.jump(JEQ_K, value_high, equal_high, not_greater);
                asm.bind(equal_high);
            }
            let code = if matches!(condition.op, Op::Gt | Op::Le) {
                JGT_K
            } else {
                JGE_K
            };
            word(asm, low_word, None, code, value_low, greater, not_greater);
        }
    }
    asm.bind(pass);
}

/// The syscalls both programs must decide alike: on every ABI each number up to past the
/// highest one the profile names (and the ABI boundaries), with plain arguments, small
/// first arguments (multiplexers' selectors), all bits set; syscalls with conditions also
/// with each constant of the profile, its neighbours and its other half-words in every
/// argument a condition reads; and foreign architectures.
fn probes(abis: &[Abi]) -> Vec<SeccompData> {
    let mut constants: BTreeMap<u32, BTreeSet<u64>> = BTreeMap::new();
    for abi in abis {
        for outcome in abi.outcomes.values() {
            if let Outcome::Conditional { rules, .. } = outcome {
                for c in rules.iter().flatten() {
                    let values = constants.entry(c.index).or_default();
                    let mut around = vec![c.value];
                    if let Op::MaskedEq(mask) = c.op {
                        around.extend([mask, mask | c.value, c.value & !mask]);
                    }
                    for v in around {
                        for w in [v, v & 0xffff_ffff, v | 0xffff_ffff_0000_0000, v ^ 1 << 32] {
                            values.extend([w, w.wrapping_add(1), w.wrapping_sub(1)]);
                        }
                    }
                    values.extend([0, u64::MAX]);
                }
            }
        }
    }
    let plain: Vec<[u64; 6]> = std::iter::once([0; 6])
        .chain((1..=20).map(|v| [v, v, 0, 0, 0, 0]))
        .chain([[u64::MAX; 6], [1 << 32, 0, 0, 0, 0, 0]])
        .collect();
    // Every combination of the constants over the arguments conditions read.
    let mut conditional: Vec<[u64; 6]> = vec![[0; 6]];
    for (index, values) in &constants {
        conditional = conditional
            .iter()
            .flat_map(|args| {
                values.iter().map(move |v| {
                    let mut args = *args;
                    args[*index as usize] = *v;
                    args
                })
            })
            .collect();
    }
    let boundaries = [
        0,
        X32_SYSCALL_BIT - 1,
        X32_SYSCALL_BIT,
        0x7fff_ffff,
        0x8000_0000,
        0xbfff_ffff,
        u32::MAX - 1,
        u32::MAX,
    ];
    let mut probes = Vec::new();
    for abi in abis {
        let highest = abi.outcomes.keys().last().copied().unwrap_or(abi.low);
        let numbers: BTreeSet<u32> = (abi.low..=highest.saturating_add(64).min(abi.high))
            .chain(boundaries)
            .chain(
                abi.outcomes
                    .keys()
                    .flat_map(|nr| [nr.wrapping_sub(1), nr.wrapping_add(1)]),
            )
            .collect();
        for nr in numbers {
            let args = match abi.outcomes.get(&nr) {
                Some(Outcome::Conditional { .. }) => &conditional,
                _ => &plain,
            };
            probes.extend(args.iter().map(|args| SeccompData {
                nr,
                arch: abi.audit_arch,
                args: *args,
            }));
        }
    }
    for arch in [0, 0xc000_00b7, 0x4000_0028, AUDIT_ARCH_I386 ^ 1, u32::MAX] {
        probes.extend(boundaries.iter().map(|nr| SeccompData {
            nr: *nr,
            arch,
            args: [0; 6],
        }));
    }
    probes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bpf::evaluate;

    fn data(arch: u32, nr: u32, args: [u64; 6]) -> SeccompData {
        SeccompData { nr, arch, args }
    }

    /// Builds one condition's check into a program returning 1 when it holds, else 0.
    fn check(condition: Condition, wide: bool) -> Vec<SockFilter> {
        let mut asm = Assembler::default();
        let fail = asm.label();
        emit_condition(&mut asm, &condition, wide, fail);
        asm.stmt(RET_K, 1);
        asm.bind(fail);
        asm.stmt(RET_K, 0);
        asm.finish().unwrap()
    }

    #[test]
    fn every_comparison_matches_its_64_bit_meaning() {
        let values = [
            0u64,
            1,
            0xffff_ffff,
            0x1_0000_0000,
            0x1_0000_0001,
            0x7e02_0000,
            u64::MAX,
            u64::MAX - 1,
            0x2_ffff_fffe,
        ];
        let ops = [Op::Eq, Op::Ne, Op::Lt, Op::Le, Op::Ge, Op::Gt];
        for value in values {
            for op in ops.into_iter().chain(values.map(Op::MaskedEq)) {
                let condition = Condition {
                    index: 2,
                    op,
                    value,
                };
                let program = check(condition, true);
                for arg in values {
                    let expected = match op {
                        Op::Eq => arg == value,
                        Op::Ne => arg != value,
                        Op::Lt => arg < value,
                        Op::Le => arg <= value,
                        Op::Ge => arg >= value,
                        Op::Gt => arg > value,
                        Op::MaskedEq(mask) => arg & mask == value,
                    };
                    let args = [0, 0, arg, 0, 0, 0];
                    assert_eq!(
                        evaluate(&program, &data(0, 0, args)) == 1,
                        expected,
                        "{arg:#x} {op:?} {value:#x}"
                    );
                }
            }
        }
    }

    #[test]
    fn narrow_abis_compare_the_low_word_only() {
        let condition = Condition {
            index: 0,
            op: Op::Eq,
            value: 8,
        };
        let program = check(condition, false);
        assert_eq!(evaluate(&program, &data(0, 0, [8, 0, 0, 0, 0, 0])), 1);
        assert_eq!(
            evaluate(&program, &data(0, 0, [1 << 32 | 8, 0, 0, 0, 0, 0])),
            1
        );
        assert_eq!(evaluate(&program, &data(0, 0, [9, 0, 0, 0, 0, 0])), 0);
    }

    #[test]
    fn a_bitmap_search_finds_every_number_of_every_segment() {
        let segments = [
            (0, Segment::Word(0b1010)),
            (32, Segment::Uniform(true)),
            (96, Segment::Uniform(false)),
            (128, Segment::Word(1 << 31)),
        ];
        let mut asm = Assembler::default();
        let (yes, no) = (asm.label(), asm.label());
        asm.stmt(LD_W_ABS, NR);
        load_bit_of_number(&mut asm);
        search(&mut asm, &segments, yes, no);
        asm.bind(yes);
        asm.stmt(RET_K, 1);
        asm.bind(no);
        asm.stmt(RET_K, 0);
        let program = asm.finish().unwrap();
        for nr in 0..160 {
            let expected = nr == 1 || nr == 3 || (32..96).contains(&nr) || nr == 159;
            assert_eq!(
                evaluate(&program, &data(0, nr, [0; 6])) == 1,
                expected,
                "{nr}"
            );
        }
    }
}
