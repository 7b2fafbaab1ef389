//! Harness for Accord's end-to-end tests: real gateways on loopback with real TLS and
//! on-disk stores. [`TestNet`] is the client library's local network, so the demo and the
//! tests exercise one and the same assembly.

pub use accord_client::localnet::LocalNet as TestNet;

use std::time::Duration;

use accord_client::org::Opened;
use accord_client::org::OrgClient;

/// Fetches until `want` envelopes arrived (or fails after ~10 s), acknowledging none.
pub async fn fetch_n(client: &mut OrgClient, want: usize) -> anyhow::Result<Vec<Opened>> {
    let mut got = Vec::new();
    for _ in 0..200 {
        got = client.fetch(256).await?;
        if got.len() >= want {
            return Ok(got);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("received {} of {want} envelopes in time", got.len())
}

/// An alert form, for tests that do not care about the kind.
pub fn alert(what: &str) -> accord_proto::pb::Body {
    accord_proto::pb::Body {
        form: Some(accord_proto::pb::body::Form::Alert(
            accord_proto::pb::Alert {
                what: what.into(),
                r#where: "Xa Mát – Trapeang Phlong".into(),
                ..Default::default()
            },
        )),
    }
}
