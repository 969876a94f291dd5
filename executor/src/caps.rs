//! Capability sets of a step and applying them (the `caps` crate does the syscalls).
//!
//! Sandbox steps get containerd's default set (BuildKit's: a root process shows CapEff
//! `00000000a80425fb`); insecure steps get every capability the caller holds in its
//! bounding set. Inheritable and ambient sets stay empty in both modes: a setuid or
//! file-capability binary must not regain capabilities through them (CVE-2022-29162).

use std::str::FromStr;

use caps::{CapSet, Capability, CapsHashSet};
use oci_spec::runtime::{Capabilities, Capability as OciCapability, LinuxCapabilities};

/// Errors from reading or applying capabilities.
#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    #[error("reading the caller's capability bounding set: {0}")]
    Read(String),
    #[error("unknown capability {0}")]
    Unknown(String),
    #[error("setting the {set} capability set: {reason}")]
    Apply { set: &'static str, reason: String },
}

/// containerd's default set (BuildKit sandbox mode).
pub const DEFAULT: [Capability; 14] = [
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FSETID,
    Capability::CAP_FOWNER,
    Capability::CAP_MKNOD,
    Capability::CAP_NET_RAW,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
    Capability::CAP_SETFCAP,
    Capability::CAP_SETPCAP,
    Capability::CAP_NET_BIND_SERVICE,
    Capability::CAP_SYS_CHROOT,
    Capability::CAP_KILL,
    Capability::CAP_AUDIT_WRITE,
];

/// Every capability in the calling thread's bounding set (what insecure mode may grant).
pub fn caller_bounding() -> Result<Vec<Capability>, CapsError> {
    let mut set: Vec<Capability> = caps::read(None, CapSet::Bounding)
        .map_err(|e| CapsError::Read(e.to_string()))?
        .into_iter()
        .collect();
    set.sort_by_key(|c| c.index());
    Ok(set)
}

fn to_oci(cap: Capability) -> Result<OciCapability, CapsError> {
    // oci-spec's FromStr takes the name without the CAP_ prefix (serde uses it with).
    let name = cap.to_string();
    OciCapability::from_str(name.trim_start_matches("CAP_")).map_err(|_| CapsError::Unknown(name))
}

fn from_oci(cap: &OciCapability) -> Result<Capability, CapsError> {
    let name = cap.to_string();
    let name = if name.starts_with("CAP_") {
        name
    } else {
        format!("CAP_{name}")
    };
    Capability::from_str(&name).map_err(|_| CapsError::Unknown(name))
}

/// The OCI capabilities of a step holding `caps`.
pub fn oci_capabilities(caps: &[Capability]) -> Result<LinuxCapabilities, CapsError> {
    let set: Capabilities = caps.iter().map(|c| to_oci(*c)).collect::<Result<_, _>>()?;
    let mut linux = LinuxCapabilities::default();
    linux
        .set_bounding(Some(set.clone()))
        .set_permitted(Some(set.clone()))
        .set_effective(Some(set))
        .set_inheritable(Some(Capabilities::new()))
        .set_ambient(Some(Capabilities::new()));
    Ok(linux)
}

fn convert(set: Option<&Capabilities>) -> Result<CapsHashSet, CapsError> {
    set.map_or_else(
        || Ok(CapsHashSet::new()),
        |caps| caps.iter().map(from_oci).collect(),
    )
}

/// Drops from the bounding set everything `linux` does not list. Runs before the step's
/// ids change, while the process still holds `CAP_SETPCAP`.
pub fn apply_bounding(linux: &LinuxCapabilities) -> Result<(), CapsError> {
    let keep = convert(linux.bounding().as_ref())?;
    for cap in caps::all() {
        if !keep.contains(&cap) && caps::has_cap(None, CapSet::Bounding, cap).unwrap_or(false) {
            caps::drop(None, CapSet::Bounding, cap).map_err(|e| CapsError::Apply {
                set: "bounding",
                reason: format!("{cap}: {e}"),
            })?;
        }
    }
    Ok(())
}

/// Sets the effective, permitted, inheritable and ambient sets after the ids changed
/// (with `PR_SET_KEEPCAPS`, so the permitted set survived a switch away from uid 0).
pub fn apply_process_sets(linux: &LinuxCapabilities) -> Result<(), CapsError> {
    let apply = |set: CapSet, name: &'static str, caps: &CapsHashSet| {
        caps::set(None, set, caps).map_err(|e| CapsError::Apply {
            set: name,
            reason: e.to_string(),
        })
    };
    let permitted = convert(linux.permitted().as_ref())?;
    let effective = convert(linux.effective().as_ref())?;
    let inheritable = convert(linux.inheritable().as_ref())?;
    let ambient = convert(linux.ambient().as_ref())?;
    // Effective must stay a subset of permitted at every step: lower effective first.
    apply(
        CapSet::Effective,
        "effective",
        &effective.intersection(&permitted).copied().collect(),
    )?;
    apply(CapSet::Inheritable, "inheritable", &inheritable)?;
    apply(CapSet::Permitted, "permitted", &permitted)?;
    apply(CapSet::Effective, "effective", &effective)?;
    caps::clear(None, CapSet::Ambient).map_err(|e| CapsError::Apply {
        set: "ambient",
        reason: e.to_string(),
    })?;
    for cap in ambient {
        caps::raise(None, CapSet::Ambient, cap).map_err(|e| CapsError::Apply {
            set: "ambient",
            reason: format!("{cap}: {e}"),
        })?;
    }
    Ok(())
}

/// The hex mask `/proc/self/status` shows for `caps` (e.g. `00000000a80425fb`).
pub fn mask(caps: &[Capability]) -> u64 {
    caps.iter().fold(0, |acc, c| acc | (1u64 << c.index()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_set_is_buildkits_mask() {
        assert_eq!(format!("{:016x}", mask(&DEFAULT)), "00000000a80425fb");
    }

    #[test]
    fn oci_round_trip_keeps_every_default_cap_and_empties_inheritable_and_ambient() {
        let linux = oci_capabilities(&DEFAULT).unwrap();
        let back = convert(linux.bounding().as_ref()).unwrap();
        assert_eq!(back.len(), 14);
        assert!(DEFAULT.iter().all(|c| back.contains(c)));
        assert!(linux.inheritable().as_ref().unwrap().is_empty());
        assert!(linux.ambient().as_ref().unwrap().is_empty());
    }
}
