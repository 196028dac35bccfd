//! `computepool relay`: a relay server for a pool whose workers cannot all reach each other directly
//! (behind NAT, or on networks with no route between them). Workers and clients find it through the
//! topology (`relay` on a shard); see host/axl's `transport::relay` for what a relay can and cannot see.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use computepool_axl::transport::{RelayAccess, RelayServer, Topology};

#[derive(clap::Args, Debug)]
pub struct RelayArgs {
    /// TCP address to serve on (plain HTTP, WebSocket upgrades on /relay).
    #[arg(long, default_value = "0.0.0.0:3340")]
    listen: SocketAddr,
    /// The address peers reach it at, for the printed URL (needed when --listen is 0.0.0.0 or [::]).
    #[arg(long)]
    advertise: Option<SocketAddr>,
    /// Admit only the workers and clients of these pools' topologies (repeatable). Without it, any
    /// peer may use the relay, which is for tests and relays behind a filter of their own.
    #[arg(long = "topology")]
    topologies: Vec<PathBuf>,
}

pub fn run(args: RelayArgs) -> anyhow::Result<()> {
    let access = if args.topologies.is_empty() {
        RelayAccess::Anyone
    } else {
        let pools = args.topologies.iter().map(|path| Topology::from_file(path)).collect::<Result<Vec<_>, _>>()?;
        RelayAccess::pools(&pools)
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async move {
        let admits = match &access {
            RelayAccess::Anyone => "any peer".to_string(),
            RelayAccess::Only(peers) => format!("{} peers", peers.len()),
        };
        let relay = RelayServer::spawn(args.listen, args.advertise, access)
            .await
            .with_context(|| format!("starting the relay on {} (--advertise HOST:PORT: where workers reach it)", args.listen))?;
        // The first line of stdout is the URL, for scripts and tests.
        println!("{}", relay.url());
        eprintln!("relay on {} for {admits}; give workers `\"relay\": \"{}\"` in the topology", relay.local_addr(), relay.url());
        computepool_orchestrator::shutdown_signal().await;
        relay.shutdown().await;
        anyhow::Ok(())
    })
}
