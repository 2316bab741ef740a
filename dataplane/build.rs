//! Builds the kernel programs (`shoal-ebpf`) with nightly for bpfel-unknown-none; the object
//! lands in OUT_DIR and is embedded by `src/lib.rs`.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let ebpf_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf");
    let common_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../common");
    println!("cargo:rerun-if-changed={common_dir}");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "shoal-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
    .context(
        "building the eBPF programs (run scripts/setup.sh if bpf-linker or rust-src is missing)",
    )
}
