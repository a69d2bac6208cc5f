//! `vcid finish RUN`: marks a run finished (`FinishRun`), so it takes no
//! more pushes and the stall alert stops watching it; its history and
//! exported series stay. Owns the command's wording only.

use super::client::{self, ConnectArgs};
use super::CliError;
use crate::proto::FinishRunRequest;

/// Arguments of `vcid finish`.
#[derive(Debug, clap::Args)]
pub struct FinishArgs {
    /// The run to mark finished (refused while it has open epochs).
    pub run: String,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

/// Runs `vcid finish RUN`.
pub fn run(args: FinishArgs) -> Result<(), CliError> {
    let auth = args.connect.auth()?;
    let addr = args.connect.addr.clone();
    let run = client::runtime()?.block_on(async {
        let mut grpc = client::connect(&addr, auth, &args.connect.tls).await?;
        grpc.finish_run(FinishRunRequest {
            run_id: args.run.clone(),
        })
        .await
        .map(tonic::Response::into_inner)
        .map_err(|status| client::status_error(&status, &addr, Some(&args.run)))
    })?;
    println!(
        "run {:?} is finished (since {}): {} closed epochs kept, no more pushes accepted",
        run.run_id,
        crate::server::clock::utc_timestamp(run.finished_unix_ms),
        run.closed_epochs
    );
    Ok(())
}
