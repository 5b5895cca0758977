//! Builds the eBPF object (dataplane-ebpf, for bpfel-unknown-none, with the nightly
//! toolchain and bpf-linker) and leaves it in OUT_DIR for `include_bytes_aligned!`.
//!
//! bpf-linker is looked up on PATH and in the bootstrap's cache (~/.cache/weir/bin, see
//! scripts/bootstrap.sh); if it is missing the build stops with a message saying how to
//! get it. `AYA_BUILD_SKIP=1` skips the eBPF build and writes an empty placeholder so the
//! agent still compiles (the binary then refuses to load the datapath).

use std::{env, path::PathBuf};

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let object = out_dir.join("weir-dataplane");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    println!("cargo:rerun-if-env-changed=WEIR_CACHE");
    if env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        if !object.exists() {
            std::fs::write(&object, b"").context("writing the placeholder eBPF object")?;
        }
        println!("cargo:warning=AYA_BUILD_SKIP set: the embedded eBPF object is a placeholder");
        return Ok(());
    }

    let cache = env::var_os("WEIR_CACHE")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/weir")));
    let path = env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = env::split_paths(&path).collect();
    if let Some(c) = &cache {
        dirs.push(c.join("bin"));
    }
    if !dirs.iter().any(|d| d.join("bpf-linker").is_file()) {
        return Err(anyhow!(
            "bpf-linker not found on PATH or in ~/.cache/weir/bin: run `scripts/bootstrap.sh` \
             (it builds bpf-linker against the nightly toolchain's LLVM)"
        ));
    }
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { env::set_var("PATH", env::join_paths(dirs)?) };

    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let root = manifest_dir.join("../dataplane-ebpf");
    let root = root.to_str().context("non-UTF-8 path to dataplane-ebpf")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "dataplane-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom("nightly"),
    )
    .context(
        "building the eBPF programs failed (needs the `nightly` toolchain with rust-src and \
         bpf-linker: run scripts/bootstrap.sh)",
    )
}
