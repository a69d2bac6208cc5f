//! Accepting connections for both listeners: the connection limit
//! (`--max-connections`, per listener), back-off on accept errors such as
//! EMFILE (logged, never a busy loop), TCP_NODELAY, and the TLS handshake
//! when TLS is on (each on its own task with a deadline, so a client that
//! stalls its handshake holds up nobody).
//!
//! [`Incoming`] is both a `Stream` of connections (tonic's
//! `serve_with_incoming_shutdown`) and an `axum::serve::Listener`. A
//! background task accepts; it ends when the `Incoming` is dropped. It owns
//! no protocol: HTTP/2 settings are tonic's, routes axum's, certificates
//! `tls`'s.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::server::TlsStream;

use super::tls::Acceptor;

/// Longest TLS handshake before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// First and longest pause after an accept error that is not the peer's.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));

enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// One accepted connection; holds its slot of `--max-connections` until
/// dropped.
pub(crate) struct Conn {
    io: Io,
    local: SocketAddr,
    remote: SocketAddr,
    _slot: OwnedSemaphorePermit,
}

macro_rules! delegate {
    ($self:ident, $io:ident => $call:expr) => {
        match &mut $self.get_mut().io {
            Io::Plain($io) => {
                let $io = Pin::new($io);
                $call
            }
            Io::Tls($io) => {
                let $io = Pin::new($io.as_mut());
                $call
            }
        }
    };
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_read(cx, buf))
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, io => io.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_shutdown(cx))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, io => io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(io) => io.is_write_vectored(),
            Io::Tls(io) => io.is_write_vectored(),
        }
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        tonic::transport::server::TcpConnectInfo {
            local_addr: Some(self.local),
            remote_addr: Some(self.remote),
        }
    }
}

/// The accepted (and, with TLS, handshaken) connections of one listener.
pub(crate) struct Incoming {
    rx: mpsc::Receiver<Conn>,
    local: SocketAddr,
}

/// Starts accepting on `listener`: at most `max_connections` open at once
/// (more are accepted and closed at once, so they do not wait in the
/// kernel's backlog), TLS through `tls` when set. `name` is the listener's
/// name in log lines.
pub(crate) fn incoming(
    listener: TcpListener,
    local: SocketAddr,
    max_connections: usize,
    tls: Option<Arc<Acceptor>>,
    name: &'static str,
) -> Incoming {
    let (tx, rx) = mpsc::channel(64);
    let slots = Arc::new(Semaphore::new(max_connections));
    tokio::spawn(accept_loop(listener, slots, tls, tx, name));
    Incoming { rx, local }
}

/// Errors of one connection (the peer gave up), not of the listener.
fn is_connection_error(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

async fn accept_loop(
    listener: TcpListener,
    slots: Arc<Semaphore>,
    tls: Option<Arc<Acceptor>>,
    tx: mpsc::Sender<Conn>,
    name: &'static str,
) {
    let mut backoff = BACKOFF.0;
    let mut refused: u64 = 0;
    loop {
        let accepted = tokio::select! {
            () = tx.closed() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, remote) = match accepted {
            Ok(accepted) => {
                backoff = BACKOFF.0;
                accepted
            }
            Err(err) if is_connection_error(&err) => continue,
            Err(err) => {
                // EMFILE/ENFILE/ENOBUFS: retrying at once would spin.
                tracing::error!(
                    listener = name, %err, retry_in = ?backoff,
                    "accepting a connection failed (open-file limit? see --max-connections); backing off"
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF.1);
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            refused += 1;
            // First refusal and then every 1000th, so a flood cannot fill
            // the log.
            if refused % 1000 == 1 {
                tracing::warn!(
                    listener = name, %remote, refused,
                    "connection limit reached (--max-connections); closing new connections"
                );
            }
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().unwrap_or(remote);
        match &tls {
            None => {
                let conn = Conn {
                    io: Io::Plain(stream),
                    local,
                    remote,
                    _slot: slot,
                };
                if tx.send(conn).await.is_err() {
                    return;
                }
            }
            Some(tls) => {
                let acceptor = tls.current();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            let conn = Conn {
                                io: Io::Tls(Box::new(stream)),
                                local,
                                remote,
                                _slot: slot,
                            };
                            let _ = tx.send(conn).await;
                        }
                        Ok(Err(err)) => {
                            tracing::debug!(listener = name, %remote, %err, "TLS handshake failed")
                        }
                        Err(_) => {
                            tracing::debug!(listener = name, %remote, "TLS handshake timed out")
                        }
                    }
                });
            }
        }
    }
}

impl futures::Stream for Incoming {
    type Item = Result<Conn, io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|conn| conn.map(Ok))
    }
}

impl axum::serve::Listener for Incoming {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Conn, SocketAddr) {
        match self.rx.recv().await {
            Some(conn) => {
                let remote = conn.remote;
                (conn, remote)
            }
            // The accept task only ends when this is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}
