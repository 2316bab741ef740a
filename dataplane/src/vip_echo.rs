//! User side of the VIP echo responder (`ebpf/src/vip_echo.rs`): one TCX link per task
//! overlay interface, on its network-side veth inside the network's namespace. The links
//! are held by the agent and vanish with the interface when the task ends.

use std::{fs::File, path::Path};

use anyhow::{Context as _, Result};
use aya::{
    programs::{links::FdLink, SchedClassifier, TcAttachType},
    Ebpf, EbpfLoader,
};
use shoal_common::names;

/// An attachment to one interface; dropping it detaches the program.
pub type EchoLink = FdLink;

/// The echo program loaded once; it reads the pinned VIP map.
pub struct VipEcho {
    ebpf: Ebpf,
}

impl VipEcho {
    pub fn load(maps_dir: &Path) -> Result<Self> {
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(maps_dir)
            .load(crate::EBPF_OBJECT)
            .context("loading shoal's eBPF object")?;
        let program: &mut SchedClassifier = ebpf
            .program_mut(names::VIP_ECHO)
            .context("VIP echo program missing from the eBPF object")?
            .try_into()?;
        program
            .load()
            .context("loading the VIP echo program into the kernel (verifier)")?;
        Ok(Self { ebpf })
    }

    /// Runs the program on one frame with BPF_PROG_TEST_RUN against the live maps; returns
    /// its return code and the frame as it left the program.
    pub fn test_run(&self, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        crate::test_run(&self.ebpf, names::VIP_ECHO, frame)
    }

    /// Attaches to `interface` (ingress: what the task sends) in the namespace at `netns`.
    pub fn attach(&mut self, netns: &Path, interface: &str) -> Result<EchoLink> {
        let netns = File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
        crate::attach_tcx(
            &mut self.ebpf,
            names::VIP_ECHO,
            Some(&netns),
            interface,
            TcAttachType::Ingress,
        )
    }
}
