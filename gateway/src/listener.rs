//! TLS listeners that hand tonic connections carrying their verified identity.
//!
//! Each accepted TCP connection completes its TLS handshake in its own task (a slow or
//! hostile client cannot stall the accept loop); the verified [`PeerIdentity`] travels with
//! the connection and tonic inserts it into every request's extensions.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use accord_proto::ids::SpiffeId;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::tls;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes in progress at once per listener.
const MAX_HANDSHAKES: usize = 256;

/// Who is on the other end of a connection, as its verified certificate says.
#[derive(Clone, Debug)]
pub struct PeerIdentity {
    pub id: SpiffeId,
    pub remote: SocketAddr,
}

/// A TLS connection with its verified identity.
#[derive(Debug)]
pub struct VerifiedConn {
    stream: TlsStream<TcpStream>,
    identity: PeerIdentity,
}

impl Connected for VerifiedConn {
    type ConnectInfo = PeerIdentity;
    fn connect_info(&self) -> PeerIdentity {
        self.identity.clone()
    }
}

impl AsyncRead for VerifiedConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for VerifiedConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Accepts TCP connections, runs the TLS handshake, and yields verified connections.
pub fn incoming(
    listener: TcpListener,
    config: rustls::ServerConfig,
    name: &'static str,
) -> ReceiverStream<io::Result<VerifiedConn>> {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let (tx, rx) = mpsc::channel(64);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(listener = name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            let _ = tcp.set_nodelay(true);
            // Bounded handshakes: a flood of slow TLS clients cannot exhaust the gateway.
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                tracing::warn!(listener = name, %remote, "too many handshakes in progress; dropped");
                continue;
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
                    .await
                {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::info!(listener = name, %remote, error = %e, "TLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        tracing::info!(listener = name, %remote, "TLS handshake timed out");
                        return;
                    }
                };
                // The verifier already checked the chain and the SPIFFE id; read it back.
                let id = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(tls::spiffe_id);
                let Some(Ok(id)) = id else {
                    tracing::warn!(listener = name, %remote, "verified connection without identity");
                    return;
                };
                tracing::debug!(listener = name, %remote, identity = %id, "connection verified");
                let conn = VerifiedConn {
                    stream,
                    identity: PeerIdentity { id, remote },
                };
                let _ = tx.send(Ok(conn)).await;
            });
        }
    });
    ReceiverStream::new(rx)
}
