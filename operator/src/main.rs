//! `oxcd-operator run` (the controller) and `oxcd-operator crd` (print the CRDs).

use clap::{Parser, Subcommand};
use oxcd_operator::{crd, operator};

#[derive(Parser)]
#[command(
    name = "oxcd-operator",
    version,
    about = "Kubernetes operator for oxcd clusters"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller.
    Run(operator::RunArgs),
    /// Print the CustomResourceDefinitions as YAML (what `crds/` holds).
    Crd,
    /// Init container of a restored cluster: fetch, check and restore a snapshot into this
    /// member's data dir (reads the member's ETCD_* variables).
    RestoreMember(oxcd_operator::restore::RestoreMemberArgs),
    /// Print the objects the operator creates for the EtcdClusters in a manifest file (a
    /// preview: owner references are added in the cluster).
    Render {
        /// A YAML file with one or more EtcdCluster documents.
        file: std::path::PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Two providers are compiled in (kube uses ring, object_store aws-lc-rs); use one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match cli.command {
        Command::Crd => {
            print!("{}", crd::crd_yaml());
            Ok(())
        }
        Command::Render { file } => {
            let text = std::fs::read_to_string(&file)?;
            print!("{}", oxcd_operator::resources::render_manifest(&text)?);
            Ok(())
        }
        Command::RestoreMember(args) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(oxcd_operator::restore::run(args))
        }
        Command::Run(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(operator::run(args))
        }
    }
}
