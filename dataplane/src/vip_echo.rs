//! User side of the VIP echo responder (`ebpf/src/programs/vip_echo.rs`), which also answers ARP
//! for VIPs and remote endpoints: a `cls_bpf` filter on each task overlay interface, on its
//! network-side veth inside the network's namespace (see `task_hooks`), and a pinned TCX link on
//! the node's ingress endpoint. Both outlive an agent restart; a task's filter goes with its veth.

use std::{fs::File, path::Path};

use anyhow::{Context as _, Result};
use aya::{
    programs::{SchedClassifier, TcAttachType},
    Ebpf, EbpfLoader,
};
use shoal_common::names;

use crate::{
    netlink::TcHook,
    task_hooks::{self, TaskFilter},
    PinnedTcLink,
};

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
        crate::test_run(&self.ebpf, names::VIP_ECHO, frame).map(|run| (run.code, run.frame))
    }

    /// The filter on a task's interfaces (ingress: what the task sends), first on its hook.
    pub fn task_filter(&self) -> Result<TaskFilter> {
        TaskFilter::new(
            &self.ebpf,
            names::VIP_ECHO,
            TcHook::Ingress,
            task_hooks::VIP_ECHO_PRIORITY,
        )
    }

    /// Attaches to the bridge side of the node's ingress endpoint, `interface` in the
    /// ingress network's namespace at `netns`: the node asks there for the backends the
    /// mesh sends to. Pinned as the node's, not a task's.
    pub fn attach_node_endpoint(
        &mut self,
        netns: &Path,
        interface: &str,
        links_dir: &Path,
    ) -> Result<PinnedTcLink> {
        let netns = File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
        PinnedTcLink::attach(
            &mut self.ebpf,
            names::VIP_ECHO,
            Some(&netns),
            (interface, TcAttachType::Ingress),
            links_dir.join(format!("echo-{interface}")),
        )
    }
}
