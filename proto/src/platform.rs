//! Platform normalisation as BuildKit's loader applies it (containerd `platforms.Normalize`).
//!
//! The loader replaces every op's platform with `{Architecture, OS, Variant}` after
//! normalising; `OSVersion` and `OSFeatures` are dropped. The vertex digest is not
//! affected, the ExecOp cache key is.

use crate::pb;

/// The platform of this host, as BuildKit's default worker platform.
pub fn host_platform() -> pb::Platform {
    let (architecture, variant) = match std::env::consts::ARCH {
        "x86_64" => ("amd64", ""),
        "aarch64" => ("arm64", ""),
        "x86" => ("386", ""),
        "arm" => ("arm", "v7"),
        "powerpc64" => ("ppc64", ""),
        "riscv64" => ("riscv64", ""),
        "s390x" => ("s390x", ""),
        other => (other, ""),
    };
    pb::Platform {
        architecture: architecture.to_owned(),
        os: std::env::consts::OS.to_owned(),
        variant: variant.to_owned(),
        ..Default::default()
    }
}

/// Normalises `platform` (or the host default when absent) the way the v0.11.6 loader does.
pub fn normalize(platform: Option<&pb::Platform>, host: &pb::Platform) -> pb::Platform {
    let Some(platform) = platform else {
        // The host default is used as is (BuildKit does not normalise it either).
        return pb::Platform {
            architecture: host.architecture.clone(),
            os: host.os.clone(),
            variant: host.variant.clone(),
            ..Default::default()
        };
    };
    let os = match platform.os.to_lowercase().as_str() {
        "" => host.os.clone(),
        "macos" => "darwin".to_owned(),
        other => other.to_owned(),
    };
    let (architecture, variant) = normalize_arch(
        &platform.architecture.to_lowercase(),
        &platform.variant.to_lowercase(),
    );
    pb::Platform {
        architecture,
        os,
        variant,
        ..Default::default()
    }
}

fn normalize_arch(arch: &str, variant: &str) -> (String, String) {
    let (arch, variant) = match arch {
        "i386" => ("386", ""),
        "x86_64" | "x86-64" | "amd64" => ("amd64", if variant == "v1" { "" } else { variant }),
        "aarch64" | "arm64" => (
            "arm64",
            if matches!(variant, "8" | "v8") {
                ""
            } else {
                variant
            },
        ),
        "armhf" => ("arm", "v7"),
        "armel" => ("arm", "v6"),
        "arm" => (
            "arm",
            match variant {
                "" | "7" => "v7",
                "5" => "v5",
                "6" => "v6",
                "8" => "v8",
                other => other,
            },
        ),
        other => (other, variant),
    };
    (arch.to_owned(), variant.to_owned())
}

/// `os/arch[/variant]`, as BuildKit prints platforms.
pub fn format(platform: &pb::Platform) -> String {
    if platform.variant.is_empty() {
        format!("{}/{}", platform.os, platform.architecture)
    } else {
        format!(
            "{}/{}/{}",
            platform.os, platform.architecture, platform.variant
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(os: &str, arch: &str, variant: &str) -> pb::Platform {
        pb::Platform {
            os: os.into(),
            architecture: arch.into(),
            variant: variant.into(),
            ..Default::default()
        }
    }

    fn host() -> pb::Platform {
        p("linux", "amd64", "")
    }

    #[test]
    fn spec_table() {
        let cases = [
            (p("", "amd64", ""), p("linux", "amd64", "")),
            (p("MacOS", "amd64", ""), p("darwin", "amd64", "")),
            (p("linux", "i386", "x"), p("linux", "386", "")),
            (p("linux", "x86_64", "v1"), p("linux", "amd64", "")),
            (p("linux", "x86-64", "v3"), p("linux", "amd64", "v3")),
            (p("Linux", "aarch64", "8"), p("linux", "arm64", "")),
            (p("linux", "arm64", "v8"), p("linux", "arm64", "")),
            (p("linux", "armhf", ""), p("linux", "arm", "v7")),
            (p("linux", "armel", ""), p("linux", "arm", "v6")),
            (p("linux", "arm", ""), p("linux", "arm", "v7")),
            (p("linux", "arm", "5"), p("linux", "arm", "v5")),
            (p("linux", "ARM", "V6"), p("linux", "arm", "v6")),
            (p("linux", "riscv64", ""), p("linux", "riscv64", "")),
        ];
        for (input, want) in cases {
            assert_eq!(normalize(Some(&input), &host()), want, "{input:?}");
        }
    }

    #[test]
    fn os_version_and_features_are_dropped() {
        let mut input = p("Linux", "aarch64", "8");
        input.os_version = "10.0".into();
        input.os_features = vec!["win32k".into()];
        assert_eq!(normalize(Some(&input), &host()), p("linux", "arm64", ""));
    }

    #[test]
    fn absent_platform_uses_host() {
        assert_eq!(normalize(None, &host()), host());
    }
}
