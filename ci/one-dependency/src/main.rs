//! Compiled by CI (`cargo build -p grinta-one-dependency`): every type an application names or
//! matches on is reachable through the adapter alone. It runs a node on loopback, dials its own
//! endpoint and exits.

use bytes::Bytes;
use grinta_tokio::{
    BytesCodec, DevCa, Error, Fabric, FlowError, FlowLimits, JsonCodec, MemberEvent, MemberState,
    Profile, RejectReason, ResetCode, TlsConfig,
};

fn describe(error: &Error) -> &'static str {
    if error.reject_reason() == Some(RejectReason::BacklogFull) {
        "backlog full"
    } else if error.application_code().is_some() {
        "reset by the application"
    } else if error.reset_code() == Some(ResetCode::Dropped) {
        "dropped by the other side"
    } else if matches!(error.flow_error(), Some(FlowError::PeerGone { .. })) {
        "peer gone"
    } else if matches!(error, Error::Lagged { .. }) {
        "lagged"
    } else {
        "other"
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let ca = DevCa::new()?;
    let tls: TlsConfig = ca.issue("node-a")?;
    let fabric = Fabric::builder("node-a")
        .bind("127.0.0.1:0".parse()?)
        .tls(tls)
        .profile(Profile::Local)
        .flow_limits(FlowLimits::default())
        .start()?;
    let endpoint = fabric.endpoint("echo")?;
    let mut flow = fabric.dial("echo").await?;
    let mut accepted = endpoint.accept().await?;
    flow.send(Bytes::from_static(b"ping")).await?;
    assert_eq!(accepted.recv().await?.as_deref(), Some(&b"ping"[..]));
    let _codecs = (BytesCodec, JsonCodec::<String>::default());
    let _ = |e: MemberEvent, s: MemberState| (e, s);
    println!("{}", describe(&Error::Shutdown));
    fabric.shutdown().await;
    Ok(())
}
