//! The SIP/RTP telephony transport: phones and PBXs call the agent (`talkline serve
//! --sip-listen`), and the agent calls patients (`talkline call sip:user@host:port`).
//!
//! Layers: [`message`] (rsip parsing, our message text), [`endpoint`] (transactions and dialogs,
//! sans-I/O; REGISTER with [`digest`] auth, REFER), [`sdp`] (G.711 offer/answer), [`rtp`] and [`g711`] (packets, DTMF, codecs),
//! [`media`] (one call's RTP socket and session), [`stream`] (SIP over TCP and TLS) and
//! [`throttle`] (per-source flood limits). This file is the I/O: one UDP socket for
//! signalling with TCP on its port and TLS beside it, a socket per call for RTP, session slots
//! shared with the other transports.

pub mod digest;
pub mod endpoint;
pub mod g711;
pub mod media;
pub mod message;
pub mod policy;
pub mod rtp;
pub mod sdp;
pub mod stream;
pub mod throttle;
#[cfg(test)]
mod torture;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use endpoint::{CallId, EndReason, Endpoint, Event, LocalAddresses, Peer, Transport};
use media::MediaEnd;
use sdp::RemoteMedia;
use stream::{Connection, Inbound};

use crate::session::Shared;

/// `talkline serve`'s SIP options.
#[derive(Debug, Clone, clap::Args)]
pub struct SipArgs {
    /// Also take phone calls over SIP on this address, e.g. 127.0.0.1:5060: UDP, and TCP on
    /// the same port. Plaintext: only on a trusted network (see --sip-tls-listen).
    #[arg(long)]
    pub sip_listen: Option<SocketAddr>,
    /// Also take SIP over TLS on this address, e.g. 0.0.0.0:5061 (beside --sip-listen, which
    /// it needs; with --sip-tls-cert and --sip-tls-key). The signalling is encrypted; the RTP
    /// media is not.
    #[arg(long, requires_all = ["sip_listen", "sip_tls_cert", "sip_tls_key"])]
    pub sip_tls_listen: Option<SocketAddr>,
    /// The certificate chain (PEM) SIP over TLS presents, for --sip-tls-listen.
    #[arg(long, value_name = "PEM", requires = "sip_tls_listen")]
    pub sip_tls_cert: Option<std::path::PathBuf>,
    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1) of --sip-tls-cert.
    #[arg(long, value_name = "PEM", requires = "sip_tls_listen")]
    pub sip_tls_key: Option<std::path::PathBuf>,
    /// The address written into SDP for RTP. Default: the SIP address's IP (or 127.0.0.1 when
    /// that is unspecified).
    #[arg(long)]
    pub sip_media_ip: Option<IpAddr>,
    /// Seconds without RTP from the caller before the call is hung up (BYE).
    #[arg(long, default_value_t = 30.0)]
    pub sip_media_timeout: f64,
    /// Where the agent transfers callers to a human (REFER), e.g. sip:nurse@clinic.example.
    /// Unset: a transfer the agent asks for is logged and the call stays with the agent.
    #[arg(long, value_parser = parse_sip_uri)]
    pub sip_transfer_to: Option<String>,
    /// Register this address of record with its registrar (digest auth, MD5 or SHA-256) and
    /// keep it registered, e.g. sip:agent@pbx.example or sip:agent@192.0.2.1:5080.
    #[arg(long, value_parser = parse_sip_uri)]
    pub sip_register: Option<String>,
    /// The digest username. Default: the user part of --sip-register.
    #[arg(long)]
    pub sip_username: Option<String>,
    /// The digest password; better given in the environment than on the command line, where
    /// other users' `ps` can read it.
    #[arg(long, env = "TALKLINE_SIP_PASSWORD", hide_env_values = true)]
    pub sip_password: Option<String>,
    /// The registration lifetime asked for, in seconds; refreshed at four fifths of what the
    /// registrar grants.
    #[arg(long, default_value_t = 3600)]
    pub sip_register_expires: u32,
    /// Destinations calls may address, repeatable: `user@host` patterns with `*` wildcards,
    /// e.g. `--sip-allow 'agent@*' --sip-allow 'sip:nurse@clinic.example'`. When set, an INVITE
    /// to any other request URI gets 403 and `--sip-transfer-to` must match. Unset: any.
    #[arg(long = "sip-allow", value_name = "PATTERN")]
    pub sip_allow: Vec<String>,
    /// Callers must authenticate (digest, SHA-256 or MD5) as one of the `user:password` lines
    /// of this file. An unknown user is answered exactly like a wrong password.
    #[arg(long, value_name = "FILE")]
    pub sip_auth_users: Option<std::path::PathBuf>,
    /// The digest realm callers authenticate in.
    #[arg(long, default_value = "talkline")]
    pub sip_auth_realm: String,
}

impl SipArgs {
    /// The allow-list and caller authentication these options ask for; an unreadable users
    /// file or a transfer target off the allow-list is an error at start-up, not at the call.
    fn policy(&self) -> anyhow::Result<(policy::DestinationAllowList, Option<policy::CallerAuth>)> {
        let allowed =
            policy::DestinationAllowList::new(&self.sip_allow).map_err(anyhow::Error::msg)?;
        if let Some(target) = &self.sip_transfer_to {
            anyhow::ensure!(
                allowed.allows(target),
                "--sip-transfer-to {target} is not on the --sip-allow list"
            );
        }
        let auth = match &self.sip_auth_users {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading --sip-auth-users {}", path.display()))?;
                let users = policy::CallerAuth::parse_users(&text)
                    .map_err(|e| anyhow::anyhow!("--sip-auth-users {}: {e}", path.display()))?;
                let mut key = [0u8; 32];
                getrandom::fill(&mut key).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
                Some(policy::CallerAuth::new(
                    &self.sip_auth_realm,
                    users,
                    key,
                    Instant::now(),
                ))
            }
        };
        Ok((allowed, auth))
    }
}

/// A `sip:` or `sips:` URI without the characters that would break out of `Refer-To: <...>`.
fn parse_sip_uri(text: &str) -> Result<String, String> {
    let scheme = text.starts_with("sip:") || text.starts_with("sips:");
    let clean = !text.contains(['<', '>', '\r', '\n', ' ', '"']);
    if scheme && clean && text.contains('@') {
        Ok(text.to_string())
    } else {
        Err(format!("{text:?} is not a sip:user@host URI"))
    }
}

/// `talkline call`'s arguments.
#[derive(Debug, clap::Args)]
pub struct CallArgs {
    /// Who to call: sip:user@host[:port] (the host must be an IP address or resolvable name).
    pub uri: String,
    /// Local SIP address to send from (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub sip_listen: SocketAddr,
    /// Seconds without RTP from the callee before the call is hung up.
    #[arg(long, default_value_t = 30.0)]
    pub media_timeout: f64,
    /// Most tokens in one reply. Default: `[agent] max_reply_tokens`.
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Destinations that may be called, repeatable (`user@host` patterns with `*`, as for
    /// `serve --sip-allow`). Unset: any.
    #[arg(long = "sip-allow", value_name = "PATTERN")]
    pub sip_allow: Vec<String>,
}

/// Session slots shared with the other transports: `reserve` numbers a session or refuses
/// (server full), `release` gives the slot back.
#[derive(Clone)]
pub struct Slots {
    pub reserve: Arc<dyn Fn() -> Option<u64> + Send + Sync>,
    pub release: Arc<dyn Fn() + Send + Sync>,
}

/// Commands from calls' media tasks to the signalling loop. Capacity: one or two per call at
/// most are ever in flight, so the queue never fills in practice. Policy when full: MediaEnded
/// waits for room; a transfer request is dropped and logged (the call stays with the agent).
const COMMAND_QUEUE: usize = 64;
/// How long hanging up at shutdown waits for the BYEs (and the un-REGISTER) to be answered.
const BYE_LINGER: Duration = Duration::from_secs(2);
/// The signalling socket's read buffer.
const RECV_BUFFER: usize = message::MAX_DATAGRAM;

enum Command {
    /// The call's media ended on its own: hang up.
    MediaEnded(CallId, MediaEnd),
    /// The agent handed the call to a human (its reason, a category such as
    /// `clinical-question`): REFER the caller to `--sip-transfer-to`.
    Transfer(CallId, String),
}

/// One call in progress, as the I/O layer holds it.
struct CallHandle {
    cancel: CancellationToken,
    remote: watch::Sender<RemoteMedia>,
}

/// The SIP user agent's I/O: the signalling socket around the sans-I/O [`Endpoint`].
pub struct Ua {
    socket: Arc<UdpSocket>,
    endpoint: Endpoint,
    shared: Arc<Shared>,
    slots: Slots,
    media_ip: IpAddr,
    media_timeout: Duration,
    /// `--sip-transfer-to`: where REFER sends callers.
    transfer_to: Option<String>,
    calls: HashMap<CallId, CallHandle>,
    commands_tx: mpsc::Sender<Command>,
    commands_rx: mpsc::Receiver<Command>,
    tasks: TaskTracker,
    /// Calls ended so far, for `talkline call` to know when to stop.
    ended: Vec<(CallId, EndReason)>,
    /// SIP over TCP, on the UDP socket's address (`serve` only).
    tcp: Option<TcpListener>,
    /// SIP over TLS (`--sip-tls-listen`).
    tls: Option<(TcpListener, TlsAcceptor)>,
    /// Open TCP and TLS connections by their remote end.
    connections: HashMap<Peer, Connection>,
    next_connection: u64,
    /// One permit per open connection (or TLS handshake): at most [`stream::MAX_CONNECTIONS`].
    connection_permits: Arc<Semaphore>,
    inbound_tx: mpsc::Sender<Inbound>,
    inbound_rx: mpsc::Receiver<Inbound>,
    /// Closes every connection at shutdown, once the BYEs are answered.
    connections_cancel: CancellationToken,
    /// When a connection was last refused for want of a slot, with a warning.
    refused_warned: Option<Instant>,
}

impl Ua {
    pub async fn bind(
        listen: SocketAddr,
        media_ip: Option<IpAddr>,
        media_timeout: Duration,
        shared: Arc<Shared>,
        slots: Slots,
    ) -> anyhow::Result<Self> {
        let socket = UdpSocket::bind(listen)
            .await
            .with_context(|| format!("binding SIP on udp {listen}"))?;
        let sip = socket.local_addr()?;
        let media_ip = media_ip.unwrap_or(if sip.ip().is_unspecified() {
            IpAddr::from([127, 0, 0, 1])
        } else {
            sip.ip()
        });
        let local = LocalAddresses {
            sip: SocketAddr::new(media_ip, sip.port()),
            media_ip,
        };
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ ((std::process::id() as u64) << 32);
        let (commands_tx, commands_rx) = mpsc::channel(COMMAND_QUEUE);
        let (inbound_tx, inbound_rx) = mpsc::channel(stream::INBOUND_QUEUE);
        Ok(Self {
            socket: Arc::new(socket),
            endpoint: Endpoint::new(local, seed),
            shared,
            slots,
            media_ip,
            media_timeout,
            transfer_to: None,
            calls: HashMap::new(),
            commands_tx,
            commands_rx,
            tasks: TaskTracker::new(),
            ended: Vec::new(),
            tcp: None,
            tls: None,
            connections: HashMap::new(),
            next_connection: 0,
            connection_permits: Arc::new(Semaphore::new(stream::MAX_CONNECTIONS)),
            inbound_tx,
            inbound_rx,
            connections_cancel: CancellationToken::new(),
            refused_warned: None,
        })
    }

    /// Listens for SIP over TCP on the UDP socket's address, and over TLS on `tls` with its
    /// acceptor.
    async fn listen_streams(
        &mut self,
        tls: Option<(SocketAddr, TlsAcceptor)>,
    ) -> anyhow::Result<()> {
        let udp = self.socket.local_addr()?;
        let tcp = TcpListener::bind(udp)
            .await
            .with_context(|| format!("binding SIP on tcp {udp}"))?;
        self.tcp = Some(tcp);
        if let Some((addr, acceptor)) = tls {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding SIP on tls {addr}"))?;
            // Named with the IP the UDP address is named with in our headers.
            let port = listener.local_addr()?.port();
            self.endpoint
                .set_tls_address(SocketAddr::new(self.media_ip, port));
            self.tls = Some((listener, acceptor));
        }
        Ok(())
    }

    /// A new inbound connection: a slot, or closed at once.
    fn accept_stream(&mut self, accepted: std::io::Result<(TcpStream, SocketAddr)>, tls: bool) {
        let (tcp, addr) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::debug!("SIP accept: {e}");
                return;
            }
        };
        let Ok(permit) = self.connection_permits.clone().try_acquire_owned() else {
            // A connection flood must not become a log flood.
            let now = Instant::now();
            if self
                .refused_warned
                .is_none_or(|last| now.duration_since(last) >= REFUSED_WARNING_INTERVAL)
            {
                self.refused_warned = Some(now);
                tracing::warn!(%addr, "refusing SIP connections: {} are open", stream::MAX_CONNECTIONS);
            }
            return;
        };
        let _ = tcp.set_nodelay(true);
        let transport = if tls { Transport::Tls } else { Transport::Tcp };
        let from = Peer::new(addr, transport);
        let (writes, id) = self.add_connection(from);
        let (inbound, cancel) = (self.inbound_tx.clone(), self.connections_cancel.clone());
        let acceptor = self.tls.as_ref().map(|(_, acceptor)| acceptor.clone());
        self.tasks.spawn(async move {
            match acceptor.filter(|_| tls) {
                None => stream::serve(tcp, from, id, writes, inbound, cancel, permit).await,
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(stream::HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
                    match handshake.await {
                        Ok(Ok(tls)) => {
                            stream::serve(tls, from, id, writes, inbound, cancel, permit).await
                        }
                        Ok(Err(e)) => {
                            tracing::info!(%addr, "SIP TLS handshake failed: {e}");
                            let _ = inbound.send(Inbound::Closed { from, id }).await;
                        }
                        Err(_) => {
                            tracing::info!(%addr, "SIP TLS handshake timed out");
                            let _ = inbound.send(Inbound::Closed { from, id }).await;
                        }
                    }
                }
            }
        });
    }

    /// Registers a connection to `peer`; returns the receiver of what is to be written on it.
    fn add_connection(&mut self, peer: Peer) -> (mpsc::Receiver<Vec<u8>>, u64) {
        self.next_connection += 1;
        let id = self.next_connection;
        let (writes, rx) = mpsc::channel(stream::WRITE_QUEUE);
        self.connections.insert(peer, Connection { id, writes });
        (rx, id)
    }

    fn handle_inbound(&mut self, inbound: Inbound) {
        match inbound {
            Inbound::Message { from, data } => {
                self.endpoint.handle_datagram(Instant::now(), from, &data);
                self.count_throttled();
            }
            Inbound::Idle { from, id } => {
                if !self.endpoint.in_call_with(from) {
                    self.remove_connection(from, id);
                }
            }
            Inbound::Closed { from, id } => self.remove_connection(from, id),
        }
    }

    /// Drops our end of a connection (its task then ends), unless a newer one took its place.
    fn remove_connection(&mut self, peer: Peer, id: u64) {
        if self.connections.get(&peer).is_some_and(|c| c.id == id) {
            self.connections.remove(&peer);
        }
    }

    fn count_throttled(&mut self) {
        let dropped = self.endpoint.take_throttled();
        if dropped > 0 {
            self.shared.metrics.sip_requests_throttled(dropped);
        }
    }

    /// Writes `data` on the connection to `to`; when that closed, on a new one where RFC 3261
    /// says (see [`stream::reopen_target`]): TCP only, since we hold no trust anchors to
    /// open TLS connections with.
    fn send_stream(&mut self, to: Peer, data: Vec<u8>) {
        let data = match self.try_write(to, data) {
            Ok(()) => return,
            Err(data) => data,
        };
        let Some(target) = stream::reopen_target(&data, to) else {
            tracing::debug!(peer = %to, "SIP connection closed and no address to reopen it");
            return;
        };
        let target = Peer::new(target, to.transport);
        let data = match self.try_write(target, data) {
            Ok(()) => return,
            Err(data) => data,
        };
        if to.transport != Transport::Tcp {
            tracing::info!(peer = %to, "the SIP TLS connection closed: message not sent");
            return;
        }
        let Ok(permit) = self.connection_permits.clone().try_acquire_owned() else {
            tracing::warn!(peer = %target, "no SIP connection slot free: message not sent");
            return;
        };
        let (writes, id) = self.add_connection(target);
        if let Some(connection) = self.connections.get(&target) {
            let _ = connection.writes.try_send(data);
        }
        let (inbound, cancel) = (self.inbound_tx.clone(), self.connections_cancel.clone());
        self.tasks.spawn(async move {
            let connect =
                tokio::time::timeout(stream::CONNECT_TIMEOUT, TcpStream::connect(target.addr));
            match connect.await {
                Ok(Ok(tcp)) => {
                    let _ = tcp.set_nodelay(true);
                    stream::serve(tcp, target, id, writes, inbound, cancel, permit).await
                }
                Ok(Err(e)) => {
                    tracing::info!(peer = %target, "SIP over TCP: cannot connect: {e}");
                    let _ = inbound.send(Inbound::Closed { from: target, id }).await;
                }
                Err(_) => {
                    tracing::info!(peer = %target, "SIP over TCP: connecting timed out");
                    let _ = inbound.send(Inbound::Closed { from: target, id }).await;
                }
            }
        });
    }

    /// Queues `data` on the open connection to `to`; gives it back when there is none.
    fn try_write(&mut self, to: Peer, data: Vec<u8>) -> Result<(), Vec<u8>> {
        let Some(connection) = self.connections.get(&to) else {
            return Err(data);
        };
        match connection.writes.try_send(data) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(peer = %to, "a SIP connection does not read: closing it");
                self.connections.remove(&to);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Closed(data)) => {
                self.connections.remove(&to);
                Err(data)
            }
        }
    }

    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.socket.local_addr()?)
    }

    /// Serves until `shutdown`; then hangs up every call and waits for their tasks.
    pub async fn run(mut self, shutdown: CancellationToken) {
        self.run_until(&shutdown, |_| false).await;
        self.finish().await;
    }

    /// Hangs up every call, waits a little for the BYEs' answers, then for every task.
    async fn finish(&mut self) {
        let now = Instant::now();
        let ids: Vec<CallId> = self.calls.keys().cloned().collect();
        for id in ids {
            self.endpoint.hang_up(now, &id);
        }
        self.endpoint.unregister(now);
        self.handle_events().await;
        let linger = CancellationToken::new();
        let timer = linger.clone();
        let waiter = tokio::spawn(async move {
            tokio::time::sleep(BYE_LINGER).await;
            timer.cancel();
        });
        self.run_until(&linger, |ua| {
            ua.endpoint.active_calls() == 0 && !ua.endpoint.has_registration()
        })
        .await;
        waiter.abort();
        self.connections_cancel.cancel();
        self.connections.clear();
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// The signalling loop, until `shutdown` or `done` says so.
    async fn run_until(&mut self, shutdown: &CancellationToken, done: impl Fn(&Self) -> bool) {
        let mut buf = vec![0u8; RECV_BUFFER];
        // What was asked before the loop (a REGISTER at start) goes out now.
        self.handle_events().await;
        while !done(self) {
            let wake = self
                .endpoint
                .poll_timeout()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                received = self.socket.recv_from(&mut buf) => match received {
                    Ok((n, from)) => {
                        self.endpoint.handle_datagram(Instant::now(), from, &buf[..n]);
                        self.count_throttled();
                    }
                    // ICMP port unreachable from an earlier send surfaces here on Linux.
                    Err(e) => tracing::debug!("SIP receive: {e}"),
                },
                Some(command) = self.commands_rx.recv() => self.handle_command(command),
                accepted = accept(self.tcp.as_ref()) => self.accept_stream(accepted, false),
                accepted = accept(self.tls.as_ref().map(|(l, _)| l)) => self.accept_stream(accepted, true),
                Some(inbound) = self.inbound_rx.recv() => self.handle_inbound(inbound),
                _ = tokio::time::sleep_until(wake.into()) => self.endpoint.handle_timeout(Instant::now()),
            }
            self.handle_events().await;
        }
    }

    fn handle_command(&mut self, command: Command) {
        match command {
            Command::MediaEnded(id, why) => {
                if why != MediaEnd::Cancelled {
                    tracing::info!(call = %id, "media ended ({why:?}): hanging up");
                }
                self.endpoint.hang_up(Instant::now(), &id);
            }
            Command::Transfer(id, reason) => {
                let Some(target) = self.transfer_to.as_deref() else {
                    tracing::info!(
                        call = %id, %reason,
                        "the agent asked for a transfer but no target is configured \
                         (--sip-transfer-to): keeping the call"
                    );
                    return;
                };
                if self.endpoint.refer(Instant::now(), &id, target) {
                    tracing::info!(call = %id, %reason, %target, "transferring the call (REFER)");
                } else {
                    tracing::info!(call = %id, %reason, "the call cannot be transferred now");
                }
            }
        }
    }

    async fn handle_events(&mut self) {
        while let Some(event) = self.endpoint.poll_event() {
            match event {
                Event::Send { to, data } if to.transport.is_reliable() => {
                    self.send_stream(to, data)
                }
                Event::Send { to, data } => {
                    if let Err(e) = self.socket.send_to(&data, to.addr).await {
                        tracing::debug!("SIP send to {to}: {e}");
                    }
                }
                Event::Incoming { call, remote } => self.answer(call, remote),
                Event::Answered { call, remote } => {
                    if let Some(handle) = self.calls.get(&call) {
                        let _ = handle.remote.send(remote);
                    }
                }
                Event::MediaChanged { call, remote } => {
                    if let Some(handle) = self.calls.get(&call) {
                        tracing::info!(call = %call, direction = ?remote.direction, "media changed");
                        let _ = handle.remote.send(remote);
                    }
                }
                Event::Ended { call, reason } => {
                    tracing::info!(call = %call, ?reason, "call ended");
                    if let Some(handle) = self.calls.remove(&call) {
                        // The slot goes back when the media task ends (see spawn_media).
                        handle.cancel.cancel();
                    }
                    self.ended.push((call, reason));
                }
            }
        }
    }

    /// An inbound call: a session slot and an RTP socket, or 503.
    fn answer(&mut self, call: CallId, remote: RemoteMedia) {
        let now = Instant::now();
        let Some(slot) = (self.slots.reserve)() else {
            tracing::info!(call = %call, "refused a call: every session slot is taken");
            self.endpoint.reject(now, &call, true);
            return;
        };
        match self.start_media(&call, remote, slot) {
            Ok(port) => self.endpoint.accept(now, &call, port),
            Err(e) => {
                tracing::warn!(call = %call, "no RTP socket: {e:#}");
                (self.slots.release)();
                self.endpoint.reject(now, &call, true);
            }
        }
    }

    /// Binds the call's RTP socket and starts its media and session; returns the RTP port.
    fn start_media(&mut self, call: &str, remote: RemoteMedia, slot: u64) -> anyhow::Result<u16> {
        let (socket, port) = self.bind_rtp()?;
        self.spawn_media(call, socket, remote, slot);
        Ok(port)
    }

    fn bind_rtp(&self) -> anyhow::Result<(UdpSocket, u16)> {
        let std_socket = std::net::UdpSocket::bind(SocketAddr::new(self.media_ip, 0))?;
        std_socket.set_nonblocking(true)?;
        let port = std_socket.local_addr()?.port();
        Ok((UdpSocket::from_std(std_socket)?, port))
    }

    fn spawn_media(&mut self, call: &str, socket: UdpSocket, remote: RemoteMedia, slot: u64) {
        let cancel = CancellationToken::new();
        let (remote_tx, remote_rx) = watch::channel(remote);
        let commands = self.commands_tx.clone();
        let release = self.slots.release.clone();
        let transfers = self.commands_tx.clone();
        let transfer_id = call.to_string();
        let request_transfer: media::TransferHook = Arc::new(move |reason: String| {
            let command = Command::Transfer(transfer_id.clone(), reason);
            if transfers.try_send(command).is_err() {
                tracing::warn!(call = %transfer_id, "the command queue is full: transfer dropped");
            }
        });
        let media = media::run(
            socket,
            remote_rx,
            self.shared.clone(),
            cancel.clone(),
            format!("sip-{slot}"),
            self.media_timeout,
            request_transfer,
        );
        let id = call.to_string();
        self.tasks.spawn(async move {
            let end = media.await;
            release();
            let _ = commands.send(Command::MediaEnded(id, end)).await;
        });
        self.calls.insert(
            call.to_string(),
            CallHandle {
                cancel,
                remote: remote_tx,
            },
        );
    }
}

/// The SIP user agent running beside `talkline serve`'s HTTP.
pub struct Running {
    task: tokio::task::JoinHandle<()>,
    shutdown: CancellationToken,
}

impl Running {
    /// Hangs up every call and waits for the user agent to finish.
    pub async fn stop(self) {
        self.shutdown.cancel();
        if let Err(e) = self.task.await {
            tracing::warn!("the SIP user agent failed: {e}");
        }
    }
}

/// Starts the user agent when `--sip-listen` is given, with the server's session slots.
pub async fn start(
    args: &SipArgs,
    shared: Arc<Shared>,
    slots: Slots,
) -> anyhow::Result<Option<Running>> {
    let Some(listen) = args.sip_listen else {
        return Ok(None);
    };
    let (allowed, caller_auth) = args.policy()?;
    let tls = match (args.sip_tls_listen, &args.sip_tls_cert, &args.sip_tls_key) {
        (Some(addr), Some(cert), Some(key)) => {
            let config = crate::tls::server_config(cert, key).context("SIP over TLS")?;
            // The HTTP listener's ALPN would refuse SIP clients that offer another protocol.
            let mut config = (*config).clone();
            config.alpn_protocols.clear();
            Some((addr, TlsAcceptor::from(Arc::new(config))))
        }
        _ => None,
    };
    let mut ua = Ua::bind(
        listen,
        args.sip_media_ip,
        Duration::from_secs_f64(args.sip_media_timeout.max(1.0)),
        shared,
        slots,
    )
    .await?;
    ua.transfer_to = args.sip_transfer_to.clone();
    ua.endpoint.set_policy(allowed, caller_auth);
    ua.listen_streams(tls).await?;
    if let Some(aor) = &args.sip_register {
        let registrar = resolve(aor).await?;
        let user = aor
            .split_once(':')
            .and_then(|(_, rest)| rest.split_once('@'))
            .map_or("", |(user, _)| user);
        let config = endpoint::RegisterConfig {
            aor: aor.clone(),
            registrar,
            username: args
                .sip_username
                .clone()
                .unwrap_or_else(|| user.to_string()),
            password: args.sip_password.clone().unwrap_or_default(),
            expires: args.sip_register_expires.max(1),
        };
        ua.endpoint.register(Instant::now(), config);
        tracing::info!(%aor, %registrar, "registering");
    }
    let sip = ua.local_addr()?;
    match ua.tls.as_ref().map(|(l, _)| l.local_addr()).transpose()? {
        Some(tls) => tracing::info!("talkline SIP on udp://{sip}, tcp://{sip} and tls://{tls}"),
        None => tracing::info!("talkline SIP on udp://{sip} and tcp://{sip}"),
    }
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(ua.run(shutdown.clone()));
    Ok(Some(Running { task, shutdown }))
}

/// `talkline call sip:user@host:port`: calls out, holds the conversation, hangs up at its end.
pub fn run_call(args: CallArgs, config_path: Option<&std::path::Path>) -> anyhow::Result<()> {
    let allowed = policy::DestinationAllowList::new(&args.sip_allow).map_err(anyhow::Error::msg)?;
    anyhow::ensure!(
        allowed.allows(&args.uri),
        "{} is not on the --sip-allow list: not calling",
        args.uri
    );
    let (config, _) = crate::config::Config::load(config_path)?;
    let store = crate::models::ModelStore::open_default()?;
    let max_tokens = args.max_tokens.unwrap_or(config.agent.max_reply_tokens);
    let shared = Arc::new(crate::serve::load_shared(&config, &store, max_tokens)?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(call(args, shared))
}

async fn call(args: CallArgs, shared: Arc<Shared>) -> anyhow::Result<()> {
    let peer = resolve(&args.uri).await?;
    let slots = Slots {
        reserve: Arc::new(|| Some(1)),
        release: Arc::new(|| {}),
    };
    let mut ua = Ua::bind(
        args.sip_listen,
        None,
        Duration::from_secs_f64(args.media_timeout.max(1.0)),
        shared,
        slots,
    )
    .await?;
    // Media starts before the answer: its port goes into our offer, and its RTP may arrive
    // with the 200 OK. Nothing is sent until the answer says where (direction inactive).
    let placeholder = RemoteMedia {
        rtp: peer,
        codec: sdp::Codec::G711(g711::Law::Mu),
        dtmf: None,
        direction: sdp::Direction::Inactive,
    };
    let (socket, port) = ua.bind_rtp()?;
    let id = ua.endpoint.call(Instant::now(), &args.uri, peer, port);
    ua.spawn_media(&id, socket, placeholder, 1);
    println!("calling {} from udp://{}", args.uri, ua.local_addr()?);
    let shutdown = CancellationToken::new();
    let ctrl_c = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        ctrl_c.cancel();
    });
    ua.run_until(&shutdown, |ua| !ua.ended.is_empty()).await;
    let reason = ua.ended.first().map(|(_, r)| *r);
    ua.finish().await;
    match reason {
        Some(EndReason::Refused(code)) => anyhow::bail!("the callee refused the call: {code}"),
        Some(EndReason::NoAnswer) => anyhow::bail!("the callee did not answer"),
        Some(reason) => {
            println!("call ended: {reason:?}");
            Ok(())
        }
        None => Ok(()),
    }
}

/// How often refusing connections (all slots taken) may be logged as a warning.
const REFUSED_WARNING_INTERVAL: Duration = Duration::from_secs(10);
/// Pause after a failed `accept` (out of file descriptors, say) before the next try.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// A listener's next connection; never, without a listener.
async fn accept(listener: Option<&TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    let Some(listener) = listener else {
        return std::future::pending().await;
    };
    let accepted = listener.accept().await;
    if accepted.is_err() {
        tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
    }
    accepted
}

/// The UDP address of a `sip:user@host[:port]` URI (port 5060 by default).
async fn resolve(uri: &str) -> anyhow::Result<SocketAddr> {
    let rest = uri
        .strip_prefix("sip:")
        .with_context(|| format!("{uri}: only sip: URIs can be called"))?;
    let host_port = rest.rsplit('@').next().unwrap_or(rest);
    let host_port = host_port.split(';').next().unwrap_or(host_port);
    let with_port = if host_port.contains(':') {
        host_port.to_string()
    } else {
        format!("{host_port}:5060")
    };
    let mut addresses = tokio::net::lookup_host(with_port.as_str())
        .await
        .with_context(|| format!("resolving {with_port}"))?;
    addresses
        .next()
        .with_context(|| format!("{with_port} has no address"))
}
