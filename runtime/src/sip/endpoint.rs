//! The SIP user agent's transactions and dialogs, sans-I/O: it is handed datagrams and the time,
//! and hands back datagrams to send and call events. It never reads a clock or touches a socket,
//! so the RFC 3261 timers are tested on a virtual clock.
//!
//! Scope: one dialog per Call-ID, over UDP, TCP or TLS (the transport is a tag on every
//! [`Peer`]; the I/O layer frames streams and keeps their connections). As a UAS it answers INVITE (100, then 180 and 200
//! once the transport has a media port, or a final error), retransmits the final response until
//! the ACK (timers G and H), and handles CANCEL, BYE, OPTIONS and re-INVITE (hold). As a UAC it
//! sends INVITE (timers A and B), ACKs the final response and sends BYE (timers E and F).
//! Registration (RFC 3261 section 10): REGISTER (timers E and F), answered challenges with
//! digest auth ([`super::digest`]), and a refresh before the binding expires.
//! Transfer (RFC 3515): an in-dialog REFER (timers E and F), the NOTIFYs with the transfer's
//! progress as sipfrag answered 200, and BYE once the target answered the transferee.
//! In-dialog requests go back to the address the peer's datagrams come from, not to its Contact:
//! what NAT'ed phones need, and equal to the Contact on a LAN. Behind a proxy that is the
//! proxy: a dialog keeps the route set its INVITE recorded (Record-Route, copied into our
//! answer, RFC 3261 section 12.1) and our in-dialog requests carry it as Route headers. Loose
//! routers (`;lr`) only: a strict router's request URI rewriting (section 12.2.1.1) is not done.
//! Reliable transports (RFC 3261 section 17): TCP and TLS deliver or fail, so requests and
//! non-2xx final responses are not retransmitted (no timers A, E or G), while timers B, F and H
//! still bound every transaction; a 2xx to INVITE is retransmitted until the ACK on every
//! transport (section 13.3.1.4: the ACK is end to end, and a hop behind a proxy may be UDP).
//! Flood throttling ([`super::throttle`]): requests that would open a transaction outside our
//! calls are metered per source address and dropped unanswered over the limit; responses and
//! requests in a call from its peer's address (ACK, BYE, CANCEL, re-INVITE, NOTIFY) are never
//! metered, so a flood cannot starve calls in progress. Initial INVITEs always are, even
//! retransmitted: a repeated INVITE must not buy unmetered answers.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::digest::{self, Challenge};
use super::message::{self, Malformed, Message, OutgoingRequest, StartLine, ALLOW};
use super::policy::{CallerAuth, DestinationAllowList, Verdict};
use super::sdp::{self, LocalMedia, RemoteMedia};
use super::throttle::Throttle;

/// RFC 3261's round-trip estimate.
pub const T1: Duration = Duration::from_millis(500);
/// The longest retransmission interval of non-INVITE requests and INVITE responses.
pub const T2: Duration = Duration::from_secs(4);
/// Timers B, F and H: how long a transaction retransmits before giving up.
pub const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(32);
/// How long an outbound call may ring once the callee answered 1xx.
pub const RING_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a transfer the peer accepted (202) may take before we hang up anyway: the
/// transferee's INVITE rings the target for a while, but a final NOTIFY that never comes must
/// not keep the call with the agent forever.
pub const TRANSFER_TIMEOUT: Duration = Duration::from_secs(60);
/// After a failed registration (refused, wrong credentials, no answer), how long until we try
/// again: a registrar that refuses us is not hammered.
pub const REGISTER_RETRY: Duration = Duration::from_secs(60);
/// Seconds a caller refused for lack of sessions is asked to wait.
pub const RETRY_AFTER_S: u32 = 5;
/// Answers kept for BYEs of ended calls, so a retransmitted BYE gets 200, not 481. Policy when
/// full: the answer is not kept (the peer sees a 481 for a BYE it already got answered).
const ENDED_CAPACITY: usize = 1_024;

pub type CallId = String;

/// How SIP messages travel between us and a peer (RFC 3261 section 18).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Udp,
    Tcp,
    Tls,
}

impl Transport {
    /// TCP and TLS deliver or fail: nothing is retransmitted hop by hop over them.
    pub fn is_reliable(self) -> bool {
        self != Transport::Udp
    }

    /// The Via header's transport token.
    fn via_token(self) -> &'static str {
        match self {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
            Transport::Tls => "TLS",
        }
    }
}

/// The other end of a message: its address and the transport between us. For TCP and TLS the
/// address is the connection's remote end, so an answer goes back on the connection its
/// request came on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Peer {
    pub addr: SocketAddr,
    pub transport: Transport,
}

impl Peer {
    pub fn new(addr: SocketAddr, transport: Transport) -> Self {
        Self { addr, transport }
    }
}

/// A bare address is a UDP peer, as before streams were served.
impl From<SocketAddr> for Peer {
    fn from(addr: SocketAddr) -> Self {
        Self::new(addr, Transport::Udp)
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.transport.via_token())
    }
}

/// What the transport must do or know.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    Send {
        to: Peer,
        data: Vec<u8>,
    },
    /// A new inbound call: answer with [`Endpoint::accept`] or [`Endpoint::reject`].
    Incoming {
        call: CallId,
        remote: RemoteMedia,
    },
    /// Our outbound call was answered: media may start.
    Answered {
        call: CallId,
        remote: RemoteMedia,
    },
    /// The peer changed the media (re-INVITE): hold, resume, another address.
    MediaChanged {
        call: CallId,
        remote: RemoteMedia,
    },
    /// The call is over; stop its media and session.
    Ended {
        call: CallId,
        reason: EndReason,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// The peer sent BYE.
    RemoteBye,
    /// We sent BYE.
    LocalBye,
    /// The caller cancelled before the answer.
    Cancelled,
    /// Our answer was never acknowledged (timer H).
    NoAck,
    /// The callee refused our call with this status.
    Refused(u16),
    /// The callee never answered (timer B or the ring timeout).
    NoAnswer,
    /// We transferred the caller (REFER) and hung up once the target answered, or once the
    /// transfer's final NOTIFY was overdue.
    Transferred,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// UAS: 100 sent, waiting for the transport to accept or reject.
    Offered,
    /// UAS: a final response sent, retransmitted until the ACK.
    Answered,
    Rejected,
    /// UAC: INVITE sent, no final response yet.
    Calling,
    Confirmed,
    /// BYE sent, waiting for its answer.
    Terminating,
}

/// A message that is sent again on a doubling interval until answered or given up.
#[derive(Debug)]
struct Retransmit {
    data: Vec<u8>,
    to: Peer,
    next: Option<Instant>,
    interval: Duration,
    /// INVITE requests keep doubling; everything else stops at T2.
    cap: Option<Duration>,
    give_up: Instant,
}

impl Retransmit {
    /// RFC 3261 17.1.2.2, Proceeding (a provisional answer came): keep retransmitting, but only
    /// every T2.
    fn proceeding(&mut self, now: Instant) {
        self.interval = T2;
        if self.next.is_some() {
            self.next = Some(now + T2);
        }
    }

    /// A request or a non-2xx final response: retransmitted over UDP only (timers A, E and
    /// G), given up after the transaction timeout on every transport (timers B, F and H).
    fn new(now: Instant, data: Vec<u8>, to: Peer, cap: Option<Duration>) -> Self {
        let mut r = Self::until_acked(now, data, to);
        r.cap = cap;
        if to.transport.is_reliable() {
            r.next = None;
        }
        r
    }

    /// A 2xx to INVITE: every T1, doubling up to T2, on every transport until the ACK or
    /// timer H (RFC 3261 section 13.3.1.4).
    fn until_acked(now: Instant, data: Vec<u8>, to: Peer) -> Self {
        Self {
            data,
            to,
            next: Some(now + T1),
            interval: T1,
            cap: Some(T2),
            give_up: now + TRANSACTION_TIMEOUT,
        }
    }

    fn deadline(&self) -> Instant {
        self.next.map_or(self.give_up, |n| n.min(self.give_up))
    }

    /// The datagram to send again when its retransmission is due, doubling the interval.
    fn fire(&mut self, now: Instant) -> Option<Event> {
        if self.next.is_none_or(|n| n > now) {
            return None;
        }
        self.interval = match self.cap {
            Some(cap) => (self.interval * 2).min(cap),
            None => self.interval * 2,
        };
        self.next = Some(now + self.interval);
        Some(Event::Send {
            to: self.to,
            data: self.data.clone(),
        })
    }
}

/// Our REFER and the implicit subscription to its progress (RFC 3515).
#[derive(Debug)]
struct Transfer {
    /// The REFER until its final response (timers E and F).
    retransmit: Option<Retransmit>,
    cseq: u32,
    /// Once accepted: when we stop waiting for the final NOTIFY and hang up.
    deadline: Option<Instant>,
}

impl Transfer {
    fn deadline(&self) -> Option<Instant> {
        self.retransmit
            .as_ref()
            .map(Retransmit::deadline)
            .or(self.deadline)
    }
}

struct Call {
    state: State,
    /// Where the peer's signalling comes from; in-dialog requests go there.
    peer: Peer,
    local_tag: String,
    /// Our From (UAC) or To (UAS) value, with our tag.
    local_party: String,
    /// The other side's, with its tag once known.
    remote_party: String,
    remote_target: String,
    /// The dialog's route set: the proxies that record-routed the INVITE, nearest first, as
    /// the Route headers of our requests in the dialog.
    route_set: Vec<String>,
    local_cseq: u32,
    /// The request the pending final response answers (UAS INVITE or re-INVITE).
    invite: Option<Message>,
    /// Our last response to that INVITE, for its retransmissions.
    last_response: Option<Vec<u8>>,
    /// Our pending final INVITE response (UAS) or request (UAC INVITE, BYE).
    retransmit: Option<Retransmit>,
    /// The branch and CSeq of our pending request.
    request: Option<(String, u32)>,
    local_media: LocalMedia,
    remote: Option<RemoteMedia>,
    /// Our transfer of this call, while one is under way.
    transfer: Option<Transfer>,
}

impl Call {
    /// Our next request in the dialog (BYE, REFER): the next CSeq, to the remote target, through
    /// the route set, then `extra_headers`.
    fn next_request(
        &mut self,
        local: &Local,
        method: &str,
        id: &str,
        branch: &str,
        contact: Option<&str>,
        extra_headers: &[(&'static str, String)],
    ) -> Vec<u8> {
        self.local_cseq += 1;
        let mut headers = route_headers(&self.route_set);
        headers.extend_from_slice(extra_headers);
        OutgoingRequest {
            method,
            uri: &self.remote_target,
            via: via(local, self.peer.transport, branch),
            from: &self.local_party,
            to: &self.remote_party,
            call_id: id,
            cseq: self.local_cseq,
            contact,
            body: None,
        }
        .to_bytes_with(&headers)
    }
}

/// What `--sip-register` asks for.
#[derive(Clone)]
pub struct RegisterConfig {
    /// Our address of record, `sip:user@registrar[:port]`.
    pub aor: String,
    /// Where the registrar listens.
    pub registrar: SocketAddr,
    pub username: String,
    pub password: String,
    /// The binding's lifetime we ask for, in seconds.
    pub expires: u32,
}

/// The registration we keep up. Not `Debug`: it holds the password.
struct Registration {
    config: RegisterConfig,
    /// `sip:registrar[:port]`, the REGISTER's request URI.
    uri: String,
    call_id: String,
    local_tag: String,
    cseq: u32,
    /// The pending REGISTER (timers E and F).
    retransmit: Option<Retransmit>,
    /// When the next REGISTER goes out (a refresh, or a retry after a failure).
    next: Option<Instant>,
    /// The challenge the pending REGISTER answers and how often that nonce was used: a second
    /// challenge that is not `stale` means the credentials are wrong, not the nonce old.
    answered: Option<(Challenge, u32)>,
    /// Shutting down: the REGISTERs now ask for `Expires: 0`, and the registration ends with
    /// their answer.
    removing: bool,
}

impl Registration {
    fn deadline(&self) -> Option<Instant> {
        self.retransmit
            .as_ref()
            .map(Retransmit::deadline)
            .or(self.next)
    }
}

/// Our own addresses, as written into headers and SDP.
#[derive(Debug, Clone, Copy)]
pub struct LocalAddresses {
    pub sip: SocketAddr,
    pub media_ip: IpAddr,
}

/// Our addresses with the TLS listener's, when there is one: what Via and Contact name.
#[derive(Debug, Clone, Copy)]
struct Local {
    addresses: LocalAddresses,
    tls: Option<SocketAddr>,
}

pub struct Endpoint {
    local: Local,
    calls: HashMap<CallId, Call>,
    /// Answers to BYEs of ended calls, until they expire.
    ended: HashMap<CallId, (Vec<u8>, Peer, Instant)>,
    /// Meters requests that would open a transaction outside our calls, per source.
    throttle: Throttle,
    /// Requests dropped by the throttle since [`Endpoint::take_throttled`] last asked.
    throttled: u64,
    events: VecDeque<Event>,
    registration: Option<Registration>,
    /// `--sip-allow`: the request URIs INVITEs may address.
    allowed: DestinationAllowList,
    /// `--sip-auth-users`: callers must answer a digest challenge.
    caller_auth: Option<CallerAuth>,
    /// Seed and counter for tags, branches and Call-IDs.
    seed: u64,
    counter: u64,
}

impl Endpoint {
    /// `seed` makes our identifiers unique across processes (the transport passes entropy).
    pub fn new(local: LocalAddresses, seed: u64) -> Self {
        Self {
            local: Local {
                addresses: local,
                tls: None,
            },
            calls: HashMap::new(),
            ended: HashMap::new(),
            throttle: Throttle::default(),
            throttled: 0,
            events: VecDeque::new(),
            registration: None,
            allowed: DestinationAllowList::default(),
            caller_auth: None,
            seed,
            counter: 0,
        }
    }

    /// Which INVITEs are answered: those to a request URI on `allowed` and, with `caller_auth`,
    /// from callers with valid digest credentials (the others get 403 and 401).
    pub fn set_policy(&mut self, allowed: DestinationAllowList, caller_auth: Option<CallerAuth>) {
        self.allowed = allowed;
        self.caller_auth = caller_auth;
    }

    /// The address TLS peers reach us at, written into Via and Contact of TLS dialogs.
    pub fn set_tls_address(&mut self, addr: SocketAddr) {
        self.local.tls = Some(addr);
    }

    /// How many requests the flood throttle dropped since the last call.
    pub fn take_throttled(&mut self) -> u64 {
        std::mem::take(&mut self.throttled)
    }

    /// Whether a call in progress talks with `peer`: its stream connection is kept open even
    /// when idle.
    pub fn in_call_with(&self, peer: Peer) -> bool {
        self.calls.values().any(|c| c.peer == peer)
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    pub fn active_calls(&self) -> usize {
        self.calls.len()
    }

    /// The next moment [`Endpoint::handle_timeout`] has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let calls = self.calls.values();
        let retransmits = calls.filter_map(|c| c.retransmit.as_ref().map(Retransmit::deadline));
        let transfers = self
            .calls
            .values()
            .filter_map(|c| c.transfer.as_ref().and_then(Transfer::deadline));
        let expiries = self.ended.values().map(|(_, _, expiry)| *expiry);
        let registration = self.registration.as_ref().and_then(Registration::deadline);
        retransmits
            .chain(transfers)
            .chain(expiries)
            .chain(registration)
            .min()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.ended.retain(|_, (_, _, expiry)| *expiry > now);
        let due: Vec<CallId> = self
            .calls
            .iter()
            .filter(|(_, c)| c.retransmit.as_ref().is_some_and(|r| r.deadline() <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            self.retransmit_or_give_up(now, &id);
        }
        let transfers: Vec<CallId> = self
            .calls
            .iter()
            .filter(|(_, c)| {
                c.transfer
                    .as_ref()
                    .and_then(Transfer::deadline)
                    .is_some_and(|d| d <= now)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in transfers {
            self.transfer_timeout(now, &id);
        }
        self.registration_timeout(now);
    }

    /// Starts registering (and keeps the registration up) as `config` says.
    pub fn register(&mut self, now: Instant, config: RegisterConfig) {
        let host = config.aor.rsplit('@').next().unwrap_or_default();
        let host = host.split(';').next().unwrap_or_default();
        self.registration = Some(Registration {
            uri: format!("sip:{host}"),
            config,
            call_id: format!("{}@talkline", self.next_id()),
            local_tag: self.next_id(),
            cseq: 0,
            retransmit: None,
            next: None,
            answered: None,
            removing: false,
        });
        self.send_register(now, None);
    }

    /// Removes our binding (REGISTER with `Expires: 0`, RFC 3261 section 10.2.2), as a user agent
    /// going away does, so the registrar stops sending calls to an address nobody answers.
    /// Challenges are answered as usual; the registration ends with the final answer or timer F.
    pub fn unregister(&mut self, now: Instant) {
        let Some(r) = self.registration.as_mut() else {
            return;
        };
        r.removing = true;
        r.answered = None;
        self.send_register(now, None);
    }

    /// Registered, or registering or unregistering.
    pub fn has_registration(&self) -> bool {
        self.registration.is_some()
    }

    /// A REGISTER, answering `authorization` (`Proxy-Authorization` when `proxy`) if given.
    fn send_register(&mut self, now: Instant, authorization: Option<(bool, String)>) {
        let local = self.local;
        let branch = self.next_id();
        let Some(r) = self.registration.as_mut() else {
            return;
        };
        r.cseq += 1;
        let contact = contact_of(&local, Transport::Udp);
        let expires = if r.removing { 0 } else { r.config.expires };
        let mut headers = vec![("Expires", expires.to_string())];
        if let Some((proxy, value)) = authorization {
            let name = if proxy {
                "Proxy-Authorization"
            } else {
                "Authorization"
            };
            headers.push((name, value));
        }
        let aor = format!("<{}>", r.config.aor);
        let register = OutgoingRequest {
            method: "REGISTER",
            uri: &r.uri,
            via: via(&local, Transport::Udp, &branch),
            from: &format!("{aor};tag={}", r.local_tag),
            to: &aor,
            call_id: &r.call_id,
            cseq: r.cseq,
            contact: Some(&contact),
            body: None,
        }
        .to_bytes_with(&headers);
        let to = Peer::from(r.config.registrar);
        r.retransmit = Some(Retransmit::new(now, register.clone(), to, Some(T2)));
        r.next = None;
        self.send(to, register);
    }

    fn registration_timeout(&mut self, now: Instant) {
        let Some(r) = self.registration.as_mut() else {
            return;
        };
        if let Some(t) = r.retransmit.as_mut() {
            if t.give_up <= now && r.removing {
                tracing::warn!(registrar = %r.config.registrar, "un-REGISTER unanswered (timer F)");
                self.registration = None;
            } else if t.give_up <= now {
                tracing::warn!(registrar = %r.config.registrar, "REGISTER unanswered (timer F)");
                r.retransmit = None;
                r.answered = None;
                r.next = Some(now + REGISTER_RETRY);
            } else if let Some(send) = t.fire(now) {
                self.events.push_back(send);
            }
            return;
        }
        if r.next.is_some_and(|n| n <= now) {
            r.answered = None;
            self.send_register(now, None);
        }
    }

    fn handle_register_response(&mut self, now: Instant, code: u16, m: &Message) {
        let Some(r) = self.registration.as_mut() else {
            return;
        };
        if r.call_id != m.call_id || r.cseq != m.cseq {
            return;
        }
        let Some(t) = r.retransmit.as_mut() else {
            // A retransmitted final response.
            return;
        };
        if code < 200 {
            t.proceeding(now);
            return;
        }
        r.retransmit = None;
        if r.removing && (200..300).contains(&code) {
            tracing::info!(aor = %r.config.aor, "unregistered");
            self.registration = None;
            return;
        }
        if (200..300).contains(&code) {
            // The registrar may grant less than we asked: its Contact's expires, else Expires.
            let granted = m
                .contact
                .as_deref()
                .and_then(|c| message::param(c, "expires"))
                .and_then(|e| e.trim().parse().ok())
                .or(m.expires)
                .unwrap_or(r.config.expires)
                .max(1);
            // Refresh at four fifths of the lifetime: time for a challenge round trip and
            // retransmissions before the binding lapses.
            let refresh = Duration::from_secs(u64::from(granted)) * 4 / 5;
            tracing::info!(aor = %r.config.aor, expires = granted, "registered");
            r.answered = None;
            r.next = Some(now + refresh.max(Duration::from_secs(1)));
            return;
        }
        if code == 401 || code == 407 {
            let challenge = m
                .challenge
                .as_ref()
                .and_then(|(proxy, v)| digest::parse_challenge(v).map(|c| (*proxy, c)));
            if let Some((proxy, challenge)) = challenge {
                let nc = match &r.answered {
                    // Challenged again, and not for a stale nonce: the credentials are wrong;
                    // answering again would only be refused again.
                    Some(_) if !challenge.stale => None,
                    Some((previous, n)) if previous.nonce == challenge.nonce => Some(n + 1),
                    _ => Some(1),
                };
                if let Some(nc) = nc {
                    let cnonce = format!("{:016x}", splitmix64(self.seed ^ !self.counter));
                    self.counter += 1;
                    let Some(r) = self.registration.as_mut() else {
                        return;
                    };
                    let request = digest::Request {
                        method: "REGISTER",
                        uri: &r.uri,
                        username: &r.config.username,
                        password: &r.config.password,
                        cnonce: &cnonce,
                        nc,
                    };
                    let value = digest::authorization(&challenge, &request);
                    r.answered = Some((challenge, nc));
                    self.send_register(now, Some((proxy, value)));
                    return;
                }
                tracing::warn!(aor = %r.config.aor, code, "registration refused: wrong credentials?");
            } else {
                tracing::warn!(aor = %r.config.aor, code, "registration challenge we cannot answer");
            }
        } else {
            tracing::warn!(aor = %r.config.aor, code, "registration refused");
        }
        match self.registration.as_mut() {
            // Going away: nothing to retry for.
            Some(r) if r.removing => self.registration = None,
            Some(r) => {
                r.answered = None;
                r.next = Some(now + REGISTER_RETRY);
            }
            None => {}
        }
    }

    /// Timers E and F of our REFER, then the wait for its final NOTIFY.
    fn transfer_timeout(&mut self, now: Instant, id: &str) {
        let Some(call) = self.calls.get_mut(id) else {
            return;
        };
        let Some(transfer) = call.transfer.as_mut() else {
            return;
        };
        if let Some(r) = transfer.retransmit.as_mut() {
            if r.give_up <= now {
                // Timer F: a peer that never answers REFER cannot be transferred; the caller
                // stays with the agent rather than being cut off.
                tracing::info!(call = %id, "REFER unanswered (timer F): keeping the call");
                call.transfer = None;
            } else if let Some(send) = r.fire(now) {
                self.events.push_back(send);
            }
            return;
        }
        if transfer.deadline.is_some_and(|d| d <= now) {
            tracing::info!(call = %id, "no final NOTIFY for the transfer: hanging up");
            call.transfer = None;
            self.send_bye(now, id);
            self.end(id, EndReason::Transferred);
        }
    }

    fn retransmit_or_give_up(&mut self, now: Instant, id: &str) {
        let Some(call) = self.calls.get_mut(id) else {
            return;
        };
        let Some(r) = call.retransmit.as_mut() else {
            return;
        };
        if r.give_up <= now {
            call.retransmit = None;
            self.give_up(now, id);
            return;
        }
        if let Some(send) = r.fire(now) {
            self.events.push_back(send);
        }
    }

    fn give_up(&mut self, now: Instant, id: &str) {
        let Some(state) = self.calls.get(id).map(|c| c.state) else {
            return;
        };
        match state {
            // RFC 3261 13.3.1.4: no ACK for our 2xx ends the dialog with a BYE.
            State::Answered => {
                self.send_bye(now, id);
                self.end(id, EndReason::NoAck);
            }
            State::Calling => {
                self.calls.remove(id);
                self.end(id, EndReason::NoAnswer);
            }
            State::Terminating | State::Rejected | State::Offered | State::Confirmed => {
                self.calls.remove(id);
            }
        }
    }

    fn end(&mut self, id: &str, reason: EndReason) {
        self.events.push_back(Event::Ended {
            call: id.to_string(),
            reason,
        });
    }

    fn send(&mut self, to: Peer, data: Vec<u8>) {
        self.events.push_back(Event::Send { to, data });
    }

    fn next_id(&mut self) -> String {
        self.counter += 1;
        format!("{:016x}", splitmix64(self.seed ^ self.counter))
    }

    /// One message from `from`: a datagram, or one framed off a stream.
    pub fn handle_datagram(&mut self, now: Instant, from: impl Into<Peer>, datagram: &[u8]) {
        let from = from.into();
        match message::parse(datagram) {
            Ok(m) => match m.start.clone() {
                StartLine::Request { method, .. } => {
                    // An initial INVITE is metered even when its Call-ID is known (a
                    // retransmission, or a retry with credentials): repeating one must not
                    // buy unmetered answers.
                    let initial = method == "INVITE" && m.to_tag().is_none();
                    let exempt = !initial && self.in_call(from, &m.call_id);
                    if exempt || self.admit(now, from) {
                        self.handle_request(now, from, &method, m)
                    }
                }
                StartLine::Response { code } => self.handle_response(now, from, code, m),
            },
            Err(Malformed::Answer { code, partial }) => {
                if !self.admit(now, from) {
                    return;
                }
                tracing::info!(%from, code, "answered a malformed SIP request");
                self.send(from, message::response(&partial, code, None, &[], None));
            }
            Err(Malformed::Drop) => {
                tracing::debug!(%from, bytes = datagram.len(), "dropped an unparseable datagram");
            }
        }
    }

    /// A request in one of our calls (or a BYE of one just ended) from its peer's address: not
    /// throttled (initial INVITEs aside), so a flood from elsewhere, or a burst from the same
    /// PBX, cannot cut calls in progress off their ACK, BYE or CANCEL.
    fn in_call(&self, from: Peer, call_id: &str) -> bool {
        let same_host = |peer: &Peer| peer.addr.ip() == from.addr.ip();
        self.calls.get(call_id).is_some_and(|c| same_host(&c.peer))
            || self
                .ended
                .get(call_id)
                .is_some_and(|(_, p, _)| same_host(p))
    }

    /// Whether the throttle lets a request that would be answered outside our calls through;
    /// one it refuses is dropped unanswered (answering would amplify the flood) and counted.
    fn admit(&mut self, now: Instant, from: Peer) -> bool {
        if self.throttle.allow(now, from.addr.ip()) {
            return true;
        }
        self.throttled += 1;
        false
    }

    fn handle_request(&mut self, now: Instant, from: Peer, method: &str, m: Message) {
        match method {
            "INVITE" if m.to_tag().is_none() => self.handle_invite(now, from, m),
            "INVITE" => self.handle_reinvite(now, from, m),
            "ACK" => self.handle_ack(&m),
            "CANCEL" => self.handle_cancel(now, from, &m),
            "BYE" => self.handle_bye(now, from, &m),
            "NOTIFY" => self.handle_notify(now, from, &m),
            "OPTIONS" => {
                let headers = [
                    ("Allow", ALLOW.to_string()),
                    ("Accept", "application/sdp".into()),
                ];
                let tag = self.next_id();
                self.send(from, message::response(&m, 200, Some(&tag), &headers, None));
            }
            _ => {
                let headers = [("Allow", ALLOW.to_string())];
                self.send(from, message::response(&m, 405, None, &headers, None));
            }
        }
    }

    fn handle_invite(&mut self, now: Instant, from: Peer, m: Message) {
        if let Some(call) = self.calls.get(&m.call_id) {
            // A caller retrying a refused INVITE with a new CSeq (with credentials, after our
            // 401) is a new transaction; its arrival implies the refusal's ACK.
            let retry = call.state == State::Rejected
                && call
                    .invite
                    .as_ref()
                    .is_some_and(|refused| refused.cseq != m.cseq);
            if !retry {
                // A retransmitted INVITE: repeat whatever we last answered.
                if let Some(last) = call.last_response.clone() {
                    self.send(from, last);
                }
                return;
            }
            self.calls.remove(&m.call_id);
        }
        let local_tag = self.next_id();
        let request_uri = match &m.start {
            StartLine::Request { uri, .. } => uri.clone(),
            StartLine::Response { .. } => String::new(),
        };
        if !self.allowed.allows(&request_uri) {
            // The number is not logged: it may be a patient's.
            tracing::info!(%from, "refused an INVITE to a destination outside --sip-allow (403)");
            return self.refuse(now, from, m, local_tag, 403, Vec::new());
        }
        if let Some(auth) = &self.caller_auth {
            match auth.check(now, "INVITE", &request_uri, m.authorization.as_deref()) {
                Verdict::Authorized { .. } => {}
                Verdict::Challenge(values) => {
                    let headers = values
                        .into_iter()
                        .map(|v| ("WWW-Authenticate", v))
                        .collect();
                    return self.refuse(now, from, m, local_tag, 401, headers);
                }
            }
        }
        let remote = match sdp::negotiate(&m.body) {
            Ok(remote) => remote,
            Err(e) => {
                tracing::info!(%from, "refused an INVITE: {e}");
                return self.refuse(now, from, m, local_tag, 488, Vec::new());
            }
        };
        let trying = message::response(&m, 100, None, &[], None);
        self.send(from, trying.clone());
        let call = Call {
            state: State::Offered,
            peer: from,
            local_party: format!("{};tag={local_tag}", m.to),
            local_tag,
            remote_party: m.from.clone(),
            remote_target: m.contact_uri().unwrap_or_default().to_string(),
            route_set: m.record_route.clone(),
            local_cseq: 0,
            last_response: Some(trying),
            retransmit: None,
            request: None,
            local_media: self.local_media(0),
            remote: Some(remote.clone()),
            invite: Some(m.clone()),
            transfer: None,
        };
        self.calls.insert(m.call_id.clone(), call);
        self.events.push_back(Event::Incoming {
            call: m.call_id,
            remote,
        });
    }

    fn local_media(&mut self, port: u16) -> LocalMedia {
        LocalMedia {
            ip: self.local.addresses.media_ip,
            port,
            version: 1,
            session_id: splitmix64(self.seed ^ self.counter) >> 12,
        }
    }

    /// An INVITE we do not take (`code`: 401, 403, 488), retransmitted until the ACK like any
    /// final response.
    fn refuse(
        &mut self,
        now: Instant,
        from: Peer,
        m: Message,
        local_tag: String,
        code: u16,
        headers: Vec<(&str, String)>,
    ) {
        let response = message::response(&m, code, Some(&local_tag), &headers, None);
        self.send(from, response.clone());
        let call = Call {
            state: State::Rejected,
            peer: from,
            local_party: m.to.clone(),
            local_tag,
            remote_party: m.from.clone(),
            remote_target: String::new(),
            route_set: Vec::new(),
            local_cseq: 0,
            last_response: Some(response.clone()),
            retransmit: Some(Retransmit::new(now, response, from, Some(T2))),
            request: None,
            local_media: self.local_media(0),
            remote: None,
            // Kept to tell the caller's retry (a new CSeq) from a retransmission.
            invite: Some(m.clone()),
            transfer: None,
        };
        self.calls.insert(m.call_id, call);
    }

    /// Answers an offered call with our media on `media_port`: 180, then 200 with the SDP.
    pub fn accept(&mut self, now: Instant, id: &str, media_port: u16) {
        let local = self.local;
        let Some(call) = self.calls.get_mut(id) else {
            return;
        };
        let contact = contact_of(&local, call.peer.transport);
        let (Some(invite), Some(remote)) = (call.invite.as_ref(), call.remote.as_ref()) else {
            return;
        };
        if call.state != State::Offered {
            return;
        }
        call.local_media.port = media_port;
        let tag = call.local_tag.clone();
        let contact_header = [("Contact", format!("<{contact}>"))];
        let ringing = message::response(invite, 180, Some(&tag), &contact_header, None);
        let answer = sdp::answer(&call.local_media, remote);
        let ok = message::response(
            invite,
            200,
            Some(&tag),
            &[contact_header[0].clone(), ("Allow", ALLOW.to_string())],
            Some(&answer),
        );
        call.state = State::Answered;
        call.last_response = Some(ok.clone());
        call.retransmit = Some(Retransmit::until_acked(now, ok.clone(), call.peer));
        let peer = call.peer;
        self.send(peer, ringing);
        self.send(peer, ok);
    }

    /// Refuses an offered call: 503 with Retry-After when `busy` (no session slot), else 486.
    pub fn reject(&mut self, now: Instant, id: &str, busy: bool) {
        let Some(call) = self.calls.get_mut(id) else {
            return;
        };
        let Some(invite) = call.invite.as_ref() else {
            return;
        };
        if call.state != State::Offered {
            return;
        }
        let response = if busy {
            let retry = [("Retry-After", RETRY_AFTER_S.to_string())];
            message::response(invite, 503, Some(&call.local_tag), &retry, None)
        } else {
            message::response(invite, 486, Some(&call.local_tag), &[], None)
        };
        call.state = State::Rejected;
        call.last_response = Some(response.clone());
        call.retransmit = Some(Retransmit::new(now, response.clone(), call.peer, Some(T2)));
        let peer = call.peer;
        self.send(peer, response);
    }

    fn handle_reinvite(&mut self, now: Instant, from: Peer, m: Message) {
        let Some(call) = self.calls.get_mut(&m.call_id) else {
            self.send(from, message::response(&m, 481, None, &[], None));
            return;
        };
        if call.state == State::Answered && call.invite.as_ref().is_some_and(|i| i.cseq == m.cseq) {
            // A retransmission of the re-INVITE we are already answering.
            if let Some(last) = call.last_response.clone() {
                self.send(from, last);
            }
            return;
        }
        if call.state != State::Confirmed || call.retransmit.is_some() {
            // RFC 3261 14.2: an INVITE while one is pending gets 491.
            self.send(from, message::response(&m, 491, None, &[], None));
            return;
        }
        let current = call.remote.as_ref().map(|r| r.codec);
        let remote = match sdp::negotiate_keeping(&m.body, current) {
            Ok(remote) => remote,
            Err(e) => {
                tracing::info!(%from, "refused a re-INVITE: {e}");
                self.send(from, message::response(&m, 488, None, &[], None));
                return;
            }
        };
        call.local_media.version += 1;
        let answer = sdp::answer(&call.local_media, &remote);
        let contact = format!("<{}>", contact_of(&self.local, from.transport));
        let ok = message::response(&m, 200, None, &[("Contact", contact)], Some(&answer));
        call.state = State::Answered;
        call.remote = Some(remote.clone());
        call.invite = Some(m.clone());
        call.last_response = Some(ok.clone());
        call.retransmit = Some(Retransmit::until_acked(now, ok.clone(), from));
        self.send(from, ok);
        self.events.push_back(Event::MediaChanged {
            call: m.call_id,
            remote,
        });
    }

    fn handle_ack(&mut self, m: &Message) {
        let Some(call) = self.calls.get_mut(&m.call_id) else {
            return;
        };
        match call.state {
            State::Answered => {
                call.state = State::Confirmed;
                call.retransmit = None;
            }
            State::Rejected => {
                self.calls.remove(&m.call_id);
            }
            _ => {}
        }
    }

    fn handle_cancel(&mut self, now: Instant, from: Peer, m: &Message) {
        let Some(call) = self.calls.get_mut(&m.call_id) else {
            self.send(from, message::response(m, 481, None, &[], None));
            return;
        };
        let ok = message::response(m, 200, Some(&call.local_tag), &[], None);
        if call.state != State::Offered {
            // Too late: the call was answered (the caller will BYE) or already refused.
            self.send(from, ok);
            return;
        }
        let Some(invite) = call.invite.as_ref() else {
            return;
        };
        let terminated = message::response(invite, 487, Some(&call.local_tag), &[], None);
        call.state = State::Rejected;
        call.last_response = Some(terminated.clone());
        // The 487 is retransmitted like any final INVITE response; the ACK ends it.
        call.retransmit = Some(Retransmit::new(
            now,
            terminated.clone(),
            call.peer,
            Some(T2),
        ));
        let peer = call.peer;
        self.send(from, ok);
        self.send(peer, terminated);
        self.end(&m.call_id, EndReason::Cancelled);
    }

    fn handle_bye(&mut self, now: Instant, from: Peer, m: &Message) {
        if let Some((answer, _, _)) = self.ended.get(&m.call_id) {
            let answer = answer.clone();
            self.send(from, answer);
            return;
        }
        let Some(call) = self.calls.remove(&m.call_id) else {
            self.send(from, message::response(m, 481, None, &[], None));
            return;
        };
        let ok = message::response(m, 200, None, &[], None);
        if self.ended.len() < ENDED_CAPACITY {
            self.ended.insert(
                m.call_id.clone(),
                (ok.clone(), from, now + TRANSACTION_TIMEOUT),
            );
        }
        self.send(from, ok);
        if call.state != State::Terminating {
            self.end(&m.call_id, EndReason::RemoteBye);
        }
    }

    fn handle_response(&mut self, now: Instant, from: Peer, code: u16, m: Message) {
        if m.cseq_method == "REFER" {
            return self.handle_refer_response(now, code, &m);
        }
        if m.cseq_method == "REGISTER" {
            return self.handle_register_response(now, code, &m);
        }
        let Some(call) = self.calls.get_mut(&m.call_id) else {
            return;
        };
        let ours = call
            .request
            .as_ref()
            .is_some_and(|(_, cseq)| *cseq == m.cseq);
        // A 2xx to our INVITE comes again until our ACK gets through: ACK it again.
        let retransmitted_ok =
            m.cseq_method == "INVITE" && code >= 200 && call.state == State::Confirmed;
        if !ours && !retransmitted_ok {
            return;
        }
        match (m.cseq_method.as_str(), call.state) {
            ("BYE", State::Terminating) if code >= 200 => {
                self.calls.remove(&m.call_id);
            }
            ("INVITE", State::Calling) if code < 200 => {
                // Provisional: stop retransmitting, wait for the final answer a while.
                if let Some(r) = call.retransmit.as_mut() {
                    r.next = None;
                    r.give_up = now + RING_TIMEOUT;
                }
            }
            ("INVITE", State::Calling | State::Confirmed) if code < 300 => {
                self.handle_invite_ok(now, from, m)
            }
            ("INVITE", State::Calling) => {
                let ack = self.ack_for_failure(&m);
                self.calls.remove(&m.call_id);
                self.send(from, ack);
                self.end(&m.call_id, EndReason::Refused(code));
            }
            _ => {}
        }
    }

    /// A 2xx to our INVITE (or its retransmission): ACK it; the first time, media may start.
    fn handle_invite_ok(&mut self, now: Instant, from: Peer, m: Message) {
        let local = self.local;
        let branch = self.next_id();
        let Some(call) = self.calls.get_mut(&m.call_id) else {
            return;
        };
        call.remote_party = m.to.clone();
        if let Some(target) = m.contact_uri() {
            call.remote_target = target.to_string();
        }
        if call.state == State::Calling {
            // The callee's side lists the proxies from itself to us (section 12.1.2).
            call.route_set = m.record_route.iter().rev().cloned().collect();
        }
        call.peer = from;
        let ack = OutgoingRequest {
            method: "ACK",
            uri: &call.remote_target,
            via: via(&local, from.transport, &branch),
            from: &call.local_party,
            to: &call.remote_party,
            call_id: &m.call_id,
            cseq: m.cseq,
            contact: None,
            body: None,
        }
        .to_bytes_with(&route_headers(&call.route_set));
        let first = call.state == State::Calling;
        call.state = State::Confirmed;
        call.retransmit = None;
        call.request = None;
        let remote = sdp::negotiate(&m.body);
        self.send(from, ack);
        if !first {
            return;
        }
        match remote {
            Ok(remote) => self.events.push_back(Event::Answered {
                call: m.call_id,
                remote,
            }),
            Err(e) => {
                tracing::info!("the callee's answer is not usable: {e}");
                self.send_bye(now, &m.call_id);
                self.end(&m.call_id, EndReason::Refused(488));
            }
        }
    }

    /// The ACK of a non-2xx final response: same branch as the INVITE (RFC 3261 17.1.1.3).
    fn ack_for_failure(&self, response: &Message) -> Vec<u8> {
        let Some(call) = self.calls.get(&response.call_id) else {
            return Vec::new();
        };
        let branch = call.request.as_ref().map_or("", |(b, _)| b.as_str());
        OutgoingRequest {
            method: "ACK",
            uri: &call.remote_target,
            via: via(&self.local, call.peer.transport, branch),
            from: &call.local_party,
            to: &response.to,
            call_id: &response.call_id,
            cseq: response.cseq,
            contact: None,
            body: None,
        }
        .to_bytes()
    }

    /// Starts an outbound call to `uri` (`sip:user@host:port`) at `peer`, offering media on
    /// `media_port`. Returns its Call-ID; [`Event::Answered`] or [`Event::Ended`] follow.
    pub fn call(
        &mut self,
        now: Instant,
        uri: &str,
        peer: impl Into<Peer>,
        media_port: u16,
    ) -> CallId {
        let peer = peer.into();
        let call_id = format!("{}@talkline", self.next_id());
        let local_tag = self.next_id();
        let branch = self.next_id();
        let local_party = format!(
            "<sip:talkline@{}>;tag={local_tag}",
            self.local.addresses.sip
        );
        let remote_party = format!("<{uri}>");
        let mut local_media = self.local_media(media_port);
        local_media.port = media_port;
        let offer = sdp::offer(&local_media);
        let contact = contact_of(&self.local, peer.transport);
        let invite = OutgoingRequest {
            method: "INVITE",
            uri,
            via: via(&self.local, peer.transport, &branch),
            from: &local_party,
            to: &remote_party,
            call_id: &call_id,
            cseq: 1,
            contact: Some(&contact),
            body: Some(&offer),
        }
        .to_bytes();
        let call = Call {
            state: State::Calling,
            peer,
            local_tag,
            local_party,
            remote_party,
            remote_target: uri.to_string(),
            route_set: Vec::new(),
            local_cseq: 1,
            invite: None,
            last_response: None,
            retransmit: Some(Retransmit::new(now, invite.clone(), peer, None)),
            request: Some((branch, 1)),
            local_media,
            remote: None,
            transfer: None,
        };
        self.calls.insert(call_id.clone(), call);
        self.send(peer, invite);
        call_id
    }

    /// Transfers the call to `target` (`sip:nurse@host`) with an in-dialog REFER; the peer calls
    /// the target and reports in NOTIFYs, and we hang up once it answered. False when the call
    /// cannot be transferred now (not confirmed yet, ending, or a transfer under way).
    pub fn refer(&mut self, now: Instant, id: &str, target: &str) -> bool {
        let local = self.local;
        let branch = self.next_id();
        let Some(call) = self.calls.get_mut(id) else {
            return false;
        };
        if call.state != State::Confirmed || call.transfer.is_some() {
            return false;
        }
        let contact = contact_of(&local, call.peer.transport);
        let transfer_headers = [
            ("Refer-To", format!("<{target}>")),
            ("Referred-By", format!("<{contact}>")),
        ];
        let refer = call.next_request(
            &local,
            "REFER",
            id,
            &branch,
            Some(&contact),
            &transfer_headers,
        );
        call.transfer = Some(Transfer {
            retransmit: Some(Retransmit::new(now, refer.clone(), call.peer, Some(T2))),
            cseq: call.local_cseq,
            deadline: None,
        });
        let peer = call.peer;
        self.send(peer, refer);
        true
    }

    fn handle_refer_response(&mut self, now: Instant, code: u16, m: &Message) {
        let Some(call) = self.calls.get_mut(&m.call_id) else {
            return;
        };
        let Some(transfer) = call.transfer.as_mut() else {
            return;
        };
        if transfer.cseq != m.cseq {
            return;
        }
        let Some(r) = transfer.retransmit.as_mut() else {
            // A retransmitted final response, or one after a NOTIFY already said accepted.
            return;
        };
        if code < 200 {
            r.proceeding(now);
        } else if code < 300 {
            tracing::info!(call = %m.call_id, code, "the transfer was accepted");
            transfer.retransmit = None;
            transfer.deadline = Some(now + TRANSFER_TIMEOUT);
        } else {
            tracing::info!(call = %m.call_id, code, "the transfer was refused: keeping the call");
            call.transfer = None;
        }
    }

    /// The progress of our transfer (RFC 3515 section 2.4.5): the sipfrag's status line is the
    /// transferee's call to the target; a 2xx there means the target answered.
    fn handle_notify(&mut self, now: Instant, from: Peer, m: &Message) {
        let Some(call) = self.calls.get_mut(&m.call_id) else {
            self.send(from, message::response(m, 481, None, &[], None));
            return;
        };
        let Some(transfer) = call.transfer.as_mut() else {
            // Once we hung up (BYE pending), a retransmitted final NOTIFY is still answered.
            let code = if call.state == State::Terminating {
                200
            } else {
                481
            };
            self.send(from, message::response(m, code, None, &[], None));
            return;
        };
        let status = sipfrag_status(&m.body);
        if transfer.retransmit.is_some() {
            // A NOTIFY overtook the 202: the REFER was accepted.
            transfer.retransmit = None;
            transfer.deadline = Some(now + TRANSFER_TIMEOUT);
        }
        self.send(from, message::response(m, 200, None, &[], None));
        match status {
            Some(code) if (200..300).contains(&code) => {
                tracing::info!(call = %m.call_id, "the transfer target answered: hanging up");
                if let Some(call) = self.calls.get_mut(&m.call_id) {
                    call.transfer = None;
                }
                self.send_bye(now, &m.call_id);
                self.end(&m.call_id, EndReason::Transferred);
            }
            Some(code) if code >= 300 => {
                tracing::info!(call = %m.call_id, code, "the transfer failed: keeping the call");
                if let Some(call) = self.calls.get_mut(&m.call_id) {
                    call.transfer = None;
                }
            }
            // Trying, ringing, or a body we cannot read: the final NOTIFY is still to come.
            _ => {}
        }
    }

    /// We end the call (the session ended, media timed out): BYE once the dialog exists,
    /// a refusal while it is still offered.
    pub fn hang_up(&mut self, now: Instant, id: &str) {
        let Some(state) = self.calls.get(id).map(|c| c.state) else {
            return;
        };
        match state {
            State::Offered => self.reject(now, id, false),
            State::Answered | State::Confirmed => {
                self.send_bye(now, id);
                self.end(id, EndReason::LocalBye);
            }
            State::Calling => {
                // Not answered yet: forget it; a late 2xx finds no call and is ignored.
                self.calls.remove(id);
                self.end(id, EndReason::LocalBye);
            }
            State::Rejected | State::Terminating => {}
        }
    }

    fn send_bye(&mut self, now: Instant, id: &str) {
        let local = self.local;
        let branch = self.next_id();
        let Some(call) = self.calls.get_mut(id) else {
            return;
        };
        let bye = call.next_request(&local, "BYE", id, &branch, None, &[]);
        call.state = State::Terminating;
        call.request = Some((branch, call.local_cseq));
        call.retransmit = Some(Retransmit::new(now, bye.clone(), call.peer, Some(T2)));
        let peer = call.peer;
        self.send(peer, bye);
    }
}

/// A dialog's route set as the Route headers of a request in it, in order.
fn route_headers(route_set: &[String]) -> Vec<(&'static str, String)> {
    route_set
        .iter()
        .map(|route| ("Route", route.clone()))
        .collect()
}

/// The status code of a `message/sipfrag` body's status line (`SIP/2.0 200 OK`).
fn sipfrag_status(body: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(body).ok()?;
    let line = text.trim_start().lines().next()?;
    let code = line.strip_prefix("SIP/2.0 ")?.get(..3)?;
    code.parse().ok().filter(|c| (100..700).contains(c))
}

/// Where we listen for `transport`: UDP and TCP share the SIP address, TLS has its own.
fn sent_by(local: &Local, transport: Transport) -> SocketAddr {
    match (transport, local.tls) {
        (Transport::Tls, Some(tls)) => tls,
        _ => local.addresses.sip,
    }
}

/// Our Contact for a dialog over `transport`: a stream transport is named, so the peer's
/// in-dialog requests come back over it (RFC 3263 section 4.1).
fn contact_of(local: &Local, transport: Transport) -> String {
    let addr = sent_by(local, transport);
    match transport {
        Transport::Udp => format!("sip:talkline@{addr}"),
        Transport::Tcp => format!("sip:talkline@{addr};transport=tcp"),
        Transport::Tls => format!("sip:talkline@{addr};transport=tls"),
    }
}

fn via(local: &Local, transport: Transport, branch: &str) -> String {
    format!(
        "SIP/2.0/{} {};branch=z9hG4bK{branch};rport",
        transport.via_token(),
        sent_by(local, transport)
    )
}

/// A well-mixed 64-bit hash (Steele et al.'s SplitMix64): unique-looking identifiers from a
/// seed and a counter.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEER: &str = "127.0.0.1:5070";
    const OFFER: &str = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
        m=audio 40000 RTP/AVP 0 101\r\na=rtpmap:101 telephone-event/8000\r\n";

    fn endpoint() -> Endpoint {
        let local = LocalAddresses {
            sip: "127.0.0.1:5060".parse().expect("literal"),
            media_ip: "127.0.0.1".parse().expect("literal"),
        };
        Endpoint::new(local, 42)
    }

    fn peer() -> SocketAddr {
        PEER.parse().expect("literal")
    }

    fn request(method: &str, cseq: u32, to_tag: Option<&str>, body: &str) -> Vec<u8> {
        let to = match to_tag {
            Some(tag) => format!("<sip:agent@127.0.0.1>;tag={tag}"),
            None => "<sip:agent@127.0.0.1>".to_string(),
        };
        let content_type = if body.is_empty() {
            ""
        } else {
            "Content-Type: application/sdp\r\n"
        };
        format!(
            "{method} sip:agent@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP {PEER};branch=z9hG4bK-{cseq}\r\n\
             Max-Forwards: 70\r\nFrom: <sip:patient@127.0.0.1>;tag=p1\r\nTo: {to}\r\n\
             Call-ID: c1\r\nCSeq: {cseq} {method}\r\nContact: <sip:patient@{PEER}>\r\n\
             {content_type}Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    /// Every event so far, with sent datagrams reduced to their first line.
    fn drain(e: &mut Endpoint) -> Vec<String> {
        std::iter::from_fn(|| e.poll_event())
            .map(|event| match event {
                Event::Send { data, .. } => String::from_utf8_lossy(&data)
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_string(),
                other => format!("{other:?}")
                    .split(' ')
                    .next()
                    .unwrap_or_default()
                    .to_string(),
            })
            .collect()
    }

    fn sent(e: &mut Endpoint) -> Vec<Vec<u8>> {
        std::iter::from_fn(|| e.poll_event())
            .filter_map(|event| match event {
                Event::Send { data, .. } => Some(data),
                _ => None,
            })
            .collect()
    }

    /// Sends an INVITE and accepts it; returns our To tag.
    fn answered_call(e: &mut Endpoint, t0: Instant) -> String {
        e.handle_datagram(t0, peer(), &request("INVITE", 1, None, OFFER));
        assert_eq!(drain(e), ["SIP/2.0 100 Trying", "Incoming"]);
        e.accept(t0, "c1", 30_000);
        let responses = sent(e);
        assert_eq!(responses.len(), 2);
        let ok = message::parse(&responses[1]).expect("our 200 parses");
        assert_eq!(ok.code(), Some(200));
        assert!(String::from_utf8_lossy(&ok.body).contains("m=audio 30000 RTP/AVP 0 101"));
        ok.to_tag().expect("a To tag").to_string()
    }

    /// `answered_call` and the caller's ACK: a confirmed call. Returns our To tag.
    fn acknowledged_call(e: &mut Endpoint, t0: Instant) -> String {
        let tag = answered_call(e, t0);
        e.handle_datagram(t0, peer(), &request("ACK", 1, Some(&tag), ""));
        tag
    }

    /// A new endpoint with a call from `from` that is not answered yet.
    fn unanswered_call(from: impl Into<Peer>) -> (Endpoint, Instant) {
        let mut e = endpoint();
        let t0 = Instant::now();
        e.handle_datagram(t0, from, &request("INVITE", 1, None, OFFER));
        drain(&mut e);
        (e, t0)
    }

    /// Fires each retransmission timer, `intervals_ms` apart from `t0`, checking that it is
    /// the next deadline and sends the message starting with `first_line` again. Returns when
    /// the last one fired.
    fn retransmits(
        e: &mut Endpoint,
        t0: Instant,
        intervals_ms: &[u64],
        first_line: &str,
    ) -> Instant {
        let mut at = t0;
        for interval in intervals_ms {
            at += Duration::from_millis(*interval);
            assert_eq!(e.poll_timeout(), Some(at));
            e.handle_timeout(at);
            assert_eq!(drain(e), [first_line]);
        }
        at
    }

    #[test]
    fn an_invite_to_a_destination_off_the_allow_list_gets_403() {
        let mut e = endpoint();
        let allowed = DestinationAllowList::new(&["nurse@*".into()]).expect("a valid pattern");
        e.set_policy(allowed, None);
        let t0 = Instant::now();
        e.handle_datagram(t0, peer(), &request("INVITE", 1, None, OFFER));
        assert_eq!(drain(&mut e), ["SIP/2.0 403 Forbidden"]);
        // Retransmitted until the ACK, like any final answer to an INVITE.
        e.handle_timeout(t0 + T1);
        assert_eq!(drain(&mut e), ["SIP/2.0 403 Forbidden"]);
        e.handle_datagram(t0 + T1, peer(), &request("ACK", 1, None, ""));
        assert_eq!(e.active_calls(), 0);

        let mut e = endpoint();
        let allowed = DestinationAllowList::new(&["agent@*".into()]).expect("a valid pattern");
        e.set_policy(allowed, None);
        e.handle_datagram(t0, peer(), &request("INVITE", 1, None, OFFER));
        assert_eq!(drain(&mut e), ["SIP/2.0 100 Trying", "Incoming"]);
    }

    /// `request` with an `Authorization` header answering `challenge` as `user`.
    fn invite_with_credentials(cseq: u32, challenge: &str, user: &str, password: &str) -> Vec<u8> {
        let challenge = digest::parse_challenge(challenge).expect("our challenge parses");
        let value = digest::authorization(
            &challenge,
            &digest::Request {
                method: "INVITE",
                uri: "sip:agent@127.0.0.1",
                username: user,
                password,
                cnonce: "c0ffee",
                nc: 1,
            },
        );
        let text = String::from_utf8(request("INVITE", cseq, None, OFFER)).expect("ascii");
        text.replacen(
            "Max-Forwards: 70\r\n",
            &format!("Max-Forwards: 70\r\nAuthorization: {value}\r\n"),
            1,
        )
        .into_bytes()
    }

    #[test]
    fn callers_answer_a_digest_challenge_before_the_agent_answers() {
        let t0 = Instant::now();
        let users = CallerAuth::parse_users("patient:s3cret\n").expect("a users file");
        let mut e = endpoint();
        e.set_policy(
            DestinationAllowList::default(),
            Some(CallerAuth::new("talkline", users, [1; 32], t0)),
        );
        e.handle_datagram(t0, peer(), &request("INVITE", 1, None, OFFER));
        let challenge = message::parse(&sent(&mut e)[0]).expect("our 401 parses");
        assert_eq!(challenge.code(), Some(401));
        let (_, value) = challenge.challenge.expect("a WWW-Authenticate");

        // A wrong password: challenged again, and the call never reaches the agent.
        let wrong = invite_with_credentials(2, &value, "patient", "guess");
        e.handle_datagram(t0, peer(), &wrong);
        assert_eq!(drain(&mut e), ["SIP/2.0 401 Unauthorized"]);
        // The right one, without an ACK in between: a new transaction, answered.
        let right = invite_with_credentials(3, &value, "patient", "s3cret");
        e.handle_datagram(t0, peer(), &right);
        assert_eq!(drain(&mut e), ["SIP/2.0 100 Trying", "Incoming"]);
    }

    fn tcp_peer() -> Peer {
        Peer::new(peer(), Transport::Tcp)
    }

    /// Every event so far, sent messages with where they went.
    fn sent_to(e: &mut Endpoint) -> Vec<(Peer, String)> {
        std::iter::from_fn(|| e.poll_event())
            .filter_map(|event| match event {
                Event::Send { to, data } => Some((to, String::from_utf8_lossy(&data).into_owned())),
                _ => None,
            })
            .collect()
    }

    /// An INVITE over `from` accepted; returns our To tag and the 200 as sent.
    fn answered_over(e: &mut Endpoint, t0: Instant, from: Peer) -> (String, String) {
        e.handle_datagram(t0, from, &request("INVITE", 1, None, OFFER));
        assert_eq!(drain(e), ["SIP/2.0 100 Trying", "Incoming"]);
        e.accept(t0, "c1", 30_000);
        let responses = sent_to(e);
        assert!(
            responses.iter().all(|(to, _)| *to == from),
            "answered where it came from"
        );
        let ok = responses[1].1.clone();
        let tag = message::parse(ok.as_bytes())
            .expect("our 200 parses")
            .to_tag()
            .expect("a To tag")
            .to_string();
        (tag, ok)
    }

    #[test]
    fn over_tcp_the_2xx_is_still_retransmitted_until_the_ack_and_names_tcp() {
        let mut e = endpoint();
        let t0 = Instant::now();
        let (tag, ok) = answered_over(&mut e, t0, tcp_peer());
        assert!(
            ok.contains("Contact: <sip:talkline@127.0.0.1:5060;transport=tcp>\r\n"),
            "{ok}"
        );
        // RFC 3261 13.3.1.4: the 2xx goes again on every transport, T1 doubling up to T2.
        let at = retransmits(&mut e, t0, &[500, 1_000, 2_000, 4_000], "SIP/2.0 200 OK");
        e.handle_datagram(at, tcp_peer(), &request("ACK", 1, Some(&tag), ""));
        assert_eq!(e.poll_timeout(), None);
    }

    #[test]
    fn over_tcp_our_bye_is_sent_once_and_timer_f_still_ends_it() {
        let mut e = endpoint();
        let t0 = Instant::now();
        let (tag, _) = answered_over(&mut e, t0, tcp_peer());
        e.handle_datagram(t0, tcp_peer(), &request("ACK", 1, Some(&tag), ""));
        e.hang_up(t0, "c1");
        let bye = sent_to(&mut e);
        assert_eq!(bye.len(), 1);
        assert_eq!(bye[0].0, tcp_peer());
        assert!(
            bye[0]
                .1
                .contains("Via: SIP/2.0/TCP 127.0.0.1:5060;branch=z9hG4bK"),
            "{}",
            bye[0].1
        );
        // No timer E: the next deadline is timer F's.
        assert_eq!(e.poll_timeout(), Some(t0 + TRANSACTION_TIMEOUT));
        e.handle_timeout(t0 + T1);
        assert!(drain(&mut e).is_empty());
        e.handle_timeout(t0 + TRANSACTION_TIMEOUT);
        assert!(drain(&mut e).is_empty());
        assert_eq!(e.active_calls(), 0);
    }

    #[test]
    fn over_tcp_a_refusal_is_not_retransmitted_and_timer_h_clears_it() {
        let (mut e, t0) = unanswered_call(tcp_peer());
        e.reject(t0, "c1", true);
        assert_eq!(drain(&mut e), ["SIP/2.0 503 Service Unavailable"]);
        assert_eq!(e.poll_timeout(), Some(t0 + TRANSACTION_TIMEOUT));
        e.handle_timeout(t0 + T1 * 4);
        assert!(drain(&mut e).is_empty(), "no timer G over TCP");
        e.handle_timeout(t0 + TRANSACTION_TIMEOUT);
        assert_eq!(e.active_calls(), 0);
    }

    #[test]
    fn over_tcp_an_outbound_invite_has_timer_b_but_not_timer_a() {
        let mut e = endpoint();
        let t0 = Instant::now();
        e.call(t0, "sip:patient@127.0.0.1:5070", tcp_peer(), 30_002);
        let invite = sent_to(&mut e);
        assert_eq!(invite.len(), 1);
        assert!(invite[0].1.contains("Via: SIP/2.0/TCP "), "{}", invite[0].1);
        assert_eq!(e.poll_timeout(), Some(t0 + TRANSACTION_TIMEOUT));
        e.handle_timeout(t0 + T1);
        assert!(drain(&mut e).is_empty());
        e.handle_timeout(t0 + TRANSACTION_TIMEOUT);
        assert_eq!(drain(&mut e), ["Ended"]);
    }

    #[test]
    fn over_tls_via_and_contact_name_the_tls_listener() {
        let mut e = endpoint();
        e.set_tls_address("127.0.0.1:5061".parse().expect("literal"));
        let t0 = Instant::now();
        let tls = Peer::new(peer(), Transport::Tls);
        let (tag, ok) = answered_over(&mut e, t0, tls);
        assert!(
            ok.contains("Contact: <sip:talkline@127.0.0.1:5061;transport=tls>\r\n"),
            "{ok}"
        );
        e.handle_datagram(t0, tls, &request("ACK", 1, Some(&tag), ""));
        e.hang_up(t0, "c1");
        let bye = sent_to(&mut e);
        assert_eq!(bye[0].0, tls);
        assert!(
            bye[0].1.contains("Via: SIP/2.0/TLS 127.0.0.1:5061;branch="),
            "{}",
            bye[0].1
        );
        // A UDP dialog beside it still names UDP and the shared address.
        let mut udp = endpoint();
        udp.set_tls_address("127.0.0.1:5061".parse().expect("literal"));
        let (_, ok) = answered_over(&mut udp, t0, Peer::from(peer()));
        assert!(
            ok.contains("Contact: <sip:talkline@127.0.0.1:5060>\r\n"),
            "{ok}"
        );
    }

    fn options_from(n: u32) -> Vec<u8> {
        String::from_utf8_lossy(&request("OPTIONS", n, None, ""))
            .replace("Call-ID: c1\r\n", &format!("Call-ID: o{n}\r\n"))
            .into_bytes()
    }

    #[test]
    fn a_flood_is_dropped_unanswered_but_calls_in_progress_keep_their_requests() {
        let mut e = endpoint();
        let t0 = Instant::now();
        // A call from the same address that then floods (a PBX gone wrong).
        let tag = answered_call(&mut e, t0);
        for n in 0..200 {
            e.handle_datagram(t0, peer(), &options_from(n));
        }
        let answered = drain(&mut e).len();
        // The INVITE took one token.
        assert_eq!(answered, super::super::throttle::BURST as usize - 1);
        assert_eq!(e.take_throttled(), 200 - answered as u64);
        assert_eq!(e.take_throttled(), 0);
        // The call's own requests are never metered.
        e.handle_datagram(t0, peer(), &request("ACK", 1, Some(&tag), ""));
        e.handle_datagram(t0, peer(), &request("BYE", 2, Some(&tag), ""));
        assert_eq!(drain(&mut e), ["SIP/2.0 200 OK", "Ended"]);
        // A retransmitted BYE of the ended call neither.
        e.handle_datagram(t0, peer(), &request("BYE", 2, Some(&tag), ""));
        assert_eq!(drain(&mut e), ["SIP/2.0 200 OK"]);
        // A new call from the flooder is dropped; one from elsewhere is answered.
        let new_call = String::from_utf8_lossy(&request("INVITE", 1, None, OFFER))
            .replace("Call-ID: c1", "Call-ID: c2");
        e.handle_datagram(t0, peer(), new_call.as_bytes());
        assert!(drain(&mut e).is_empty());
        assert_eq!(e.take_throttled(), 1);
        let elsewhere: SocketAddr = "127.0.0.2:5070".parse().expect("literal");
        e.handle_datagram(t0, elsewhere, new_call.as_bytes());
        assert_eq!(drain(&mut e), ["SIP/2.0 100 Trying", "Incoming"]);
        // The flooder's rate comes back with time.
        e.handle_datagram(t0 + Duration::from_secs(1), peer(), &options_from(999));
        assert_eq!(drain(&mut e), ["SIP/2.0 200 OK"]);
        // Malformed requests that would be answered are metered too; a flood of them gets
        // no 400s.
        let no_call_id = String::from_utf8_lossy(&options_from(7)).replace("Call-ID: o7\r\n", "");
        let mut answers = 0;
        for _ in 0..100 {
            e.handle_datagram(t0 + Duration::from_secs(1), peer(), no_call_id.as_bytes());
            answers += drain(&mut e).len();
        }
        assert!(answers < 25, "{answers} answers to 100 malformed requests");
    }

    #[test]
    fn an_answered_invite_retransmits_its_200_on_timer_g_until_the_ack() {
        let mut e = endpoint();
        let t0 = Instant::now();
        let tag = answered_call(&mut e, t0);
        // Timer G: T1, 2*T1, 4*T1, then capped at T2.
        let intervals = [500, 1_000, 2_000, 4_000, 4_000];
        let at = retransmits(&mut e, t0, &intervals, "SIP/2.0 200 OK");
        e.handle_datagram(at, peer(), &request("ACK", 1, Some(&tag), ""));
        assert_eq!(e.poll_timeout(), None);
        assert!(drain(&mut e).is_empty());
    }

    #[test]
    fn no_ack_by_timer_h_ends_the_call_with_a_bye() {
        let mut e = endpoint();
        let t0 = Instant::now();
        answered_call(&mut e, t0);
        e.handle_timeout(t0 + TRANSACTION_TIMEOUT);
        let events = drain(&mut e);
        assert!(
            events
                .iter()
                .any(|l| l.starts_with("BYE sip:patient@127.0.0.1:5070")),
            "{events:?}"
        );
        assert_eq!(events.last().map(String::as_str), Some("Ended"));
    }

    #[test]
    fn a_retransmitted_invite_gets_the_same_answer_again() {
        let mut e = endpoint();
        let t0 = Instant::now();
        answered_call(&mut e, t0);
        e.handle_datagram(t0, peer(), &request("INVITE", 1, None, OFFER));
        assert_eq!(drain(&mut e), ["SIP/2.0 200 OK"]);
    }

    #[test]
    fn bye_ends_the_call_and_its_retransmission_is_answered_again() {
        let mut e = endpoint();
        let t0 = Instant::now();
        let tag = acknowledged_call(&mut e, t0);
        e.handle_datagram(t0, peer(), &request("BYE", 2, Some(&tag), ""));
        assert_eq!(drain(&mut e), ["SIP/2.0 200 OK", "Ended"]);
        e.handle_datagram(t0, peer(), &request("BYE", 2, Some(&tag), ""));
        assert_eq!(drain(&mut e), ["SIP/2.0 200 OK"]);
        e.handle_timeout(t0 + TRANSACTION_TIMEOUT);
        e.handle_datagram(t0, peer(), &request("BYE", 2, Some(&tag), ""));
        assert_eq!(
            drain(&mut e),
            ["SIP/2.0 481 Call/Transaction Does Not Exist"]
        );
        assert_eq!(e.active_calls(), 0);
    }

    #[test]
    fn cancel_before_the_answer_gets_200_and_the_invite_487() {
        let (mut e, t0) = unanswered_call(peer());
        e.handle_datagram(t0, peer(), &request("CANCEL", 1, None, ""));
        assert_eq!(
            drain(&mut e),
            ["SIP/2.0 200 OK", "SIP/2.0 487 Request Terminated", "Ended"]
        );
        // Accepting afterwards does nothing; the ACK for the 487 clears the call.
        e.accept(t0, "c1", 30_000);
        assert!(drain(&mut e).is_empty());
        e.handle_datagram(t0, peer(), &request("ACK", 1, None, ""));
        assert_eq!(e.active_calls(), 0);
    }

    #[test]
    fn a_full_server_answers_503_with_retry_after() {
        let (mut e, t0) = unanswered_call(peer());
        e.reject(t0, "c1", true);
        let responses = sent(&mut e);
        let text = String::from_utf8_lossy(&responses[0]);
        assert!(
            text.starts_with("SIP/2.0 503 Service Unavailable\r\n"),
            "{text}"
        );
        assert!(text.contains(&format!("Retry-After: {RETRY_AFTER_S}\r\n")));
    }

    #[test]
    fn an_offer_without_g711_gets_488() {
        let mut e = endpoint();
        let opus = OFFER.replace("RTP/AVP 0 101", "RTP/AVP 111");
        e.handle_datagram(Instant::now(), peer(), &request("INVITE", 1, None, &opus));
        assert_eq!(drain(&mut e), ["SIP/2.0 488 Not Acceptable Here"]);
    }

    #[test]
    fn options_unknown_methods_and_malformed_requests_are_answered() {
        let mut e = endpoint();
        let t0 = Instant::now();
        e.handle_datagram(t0, peer(), &request("OPTIONS", 1, None, ""));
        assert_eq!(drain(&mut e), ["SIP/2.0 200 OK"]);
        e.handle_datagram(t0, peer(), &request("MESSAGE", 2, None, ""));
        assert_eq!(drain(&mut e), ["SIP/2.0 405 Method Not Allowed"]);
        e.handle_datagram(t0, peer(), &request("FROBNICATE", 3, None, ""));
        assert_eq!(drain(&mut e), ["SIP/2.0 501 Not Implemented"]);
        e.handle_datagram(t0, peer(), b"\x16\x03\x01 not sip at all");
        assert!(drain(&mut e).is_empty());
        let no_call_id = String::from_utf8_lossy(&request("OPTIONS", 4, None, ""))
            .replace("Call-ID: c1\r\n", "");
        e.handle_datagram(t0, peer(), no_call_id.as_bytes());
        assert_eq!(drain(&mut e), ["SIP/2.0 400 Bad Request"]);
    }

    #[test]
    fn a_hold_reinvite_is_answered_recvonly_and_reported() {
        let mut e = endpoint();
        let t0 = Instant::now();
        let tag = acknowledged_call(&mut e, t0);
        let hold = format!("{OFFER}a=sendonly\r\n");
        e.handle_datagram(t0, peer(), &request("INVITE", 2, Some(&tag), &hold));
        let events: Vec<Event> = std::iter::from_fn(|| e.poll_event()).collect();
        let Event::Send { data, .. } = &events[0] else {
            panic!("expected the 200 first: {events:?}");
        };
        let ok = String::from_utf8_lossy(data);
        assert!(
            ok.starts_with("SIP/2.0 200 OK") && ok.contains("a=recvonly"),
            "{ok}"
        );
        assert!(
            ok.contains("o=talkline") && ok.contains(" 2 IN IP4"),
            "version 2: {ok}"
        );
        match &events[1] {
            Event::MediaChanged { remote, .. } => assert!(!remote.peer_receives()),
            other => panic!("expected MediaChanged, got {other:?}"),
        }
        e.handle_datagram(t0, peer(), &request("ACK", 2, Some(&tag), ""));
        assert_eq!(e.poll_timeout(), None);
    }

    #[test]
    fn our_bye_retransmits_on_timer_e_until_answered() {
        let mut e = endpoint();
        let t0 = Instant::now();
        acknowledged_call(&mut e, t0);
        e.hang_up(t0, "c1");
        let first = sent(&mut e);
        assert_eq!(first.len(), 1);
        e.handle_timeout(t0 + T1);
        let again = sent(&mut e);
        assert_eq!(again, first, "the same BYE again");
        let bye = message::parse(&first[0]).expect("our BYE parses");
        let answer = message::response(&bye, 200, None, &[], None);
        e.handle_datagram(t0 + T1, peer(), &answer);
        assert_eq!(e.active_calls(), 0);
        assert_eq!(e.poll_timeout(), None);
    }

    /// Behind a record-routing proxy (kamailio's dispatcher): our answer copies the INVITE's
    /// Record-Route, so the caller's ACK and BYE come back through the proxy, and our own BYE
    /// carries the route set as Route headers, in order, to the proxy it came from.
    #[test]
    fn a_record_routed_call_keeps_its_route_set_for_our_bye() {
        const ROUTES: &str = "Record-Route: <sip:10.0.0.1:5060;lr;ftag=p1>\r\n\
            Record-Route: <sip:10.0.0.2;lr>, <sip:10.0.0.3;lr>\r\n";
        let routes = [
            "<sip:10.0.0.1:5060;lr;ftag=p1>",
            "<sip:10.0.0.2;lr>",
            "<sip:10.0.0.3;lr>",
        ];
        let headers = |text: &str, name: &str| -> Vec<String> {
            let prefix = format!("{name}: ");
            text.lines()
                .filter_map(|l| l.strip_prefix(prefix.as_str()))
                .map(str::to_string)
                .collect()
        };
        let mut e = endpoint();
        let t0 = Instant::now();
        let invite = String::from_utf8(request("INVITE", 1, None, OFFER)).expect("ascii");
        let invite = invite.replacen(
            "Max-Forwards: 70\r\n",
            &format!("Max-Forwards: 70\r\n{ROUTES}"),
            1,
        );
        e.handle_datagram(t0, peer(), invite.as_bytes());
        assert_eq!(drain(&mut e), ["SIP/2.0 100 Trying", "Incoming"]);
        e.accept(t0, "c1", 30_000);
        let answers = sent(&mut e);
        assert_eq!(answers.len(), 2, "180 and 200");
        for answer in &answers {
            let answer = String::from_utf8_lossy(answer);
            assert_eq!(headers(&answer, "Record-Route"), routes, "{answer}");
        }
        let ok = message::parse(&answers[1]).expect("our 200 parses");
        let tag = ok.to_tag().expect("a To tag");
        e.handle_datagram(t0, peer(), &request("ACK", 1, Some(tag), ""));
        e.hang_up(t0, "c1");
        let events: Vec<Event> = std::iter::from_fn(|| e.poll_event()).collect();
        let [Event::Send { to, data }, Event::Ended { .. }] = &events[..] else {
            panic!("a BYE expected: {events:?}");
        };
        assert_eq!(to.addr, peer(), "the BYE goes to the proxy");
        let bye = String::from_utf8_lossy(data);
        let request_line = format!("BYE sip:patient@{PEER} SIP/2.0");
        assert!(bye.starts_with(&request_line), "{bye}");
        assert_eq!(headers(&bye, "Route"), routes, "{bye}");
    }

    #[test]
    fn an_outbound_call_retransmits_its_invite_until_ringing_then_acks_the_200() {
        let mut e = endpoint();
        let t0 = Instant::now();
        let id = e.call(t0, "sip:patient@127.0.0.1:5070", peer(), 30_002);
        let invite = sent(&mut e).remove(0);
        let invite = message::parse(&invite).expect("our INVITE parses");
        assert!(String::from_utf8_lossy(&invite.body).contains("m=audio 30002 RTP/AVP 0 8 101"));
        // Timer A doubles without a cap.
        e.handle_timeout(t0 + T1);
        e.handle_timeout(t0 + T1 * 3);
        assert_eq!(sent(&mut e).len(), 2);
        let ringing = message::response(&invite, 180, Some("callee"), &[], None);
        e.handle_datagram(t0 + T1 * 3, peer(), &ringing);
        e.handle_timeout(t0 + T1 * 7);
        assert!(sent(&mut e).is_empty());
        let contact = [("Contact", format!("<sip:patient@{PEER}>"))];
        let ok = message::response(&invite, 200, Some("callee"), &contact, Some(OFFER));
        e.handle_datagram(t0 + T1 * 8, peer(), &ok);
        let events: Vec<Event> = std::iter::from_fn(|| e.poll_event()).collect();
        let Event::Send { data, .. } = &events[0] else {
            panic!("expected the ACK: {events:?}");
        };
        assert!(String::from_utf8_lossy(data).starts_with("ACK sip:patient@127.0.0.1:5070 SIP/2.0"));
        assert!(matches!(&events[1], Event::Answered { call, .. } if *call == id));
        // A retransmitted 200 is ACKed again, without a second Answered.
        e.handle_datagram(t0 + T1 * 9, peer(), &ok);
        assert_eq!(drain(&mut e).len(), 1);
    }

    #[test]
    fn a_refused_outbound_call_is_acked_and_ends() {
        let mut e = endpoint();
        let t0 = Instant::now();
        e.call(t0, "sip:patient@127.0.0.1:5070", peer(), 30_002);
        let invite = message::parse(&sent(&mut e)[0]).expect("our INVITE parses");
        let busy = message::response(&invite, 486, Some("callee"), &[], None);
        e.handle_datagram(t0, peer(), &busy);
        let events = drain(&mut e);
        assert_eq!(events[0], "ACK sip:patient@127.0.0.1:5070 SIP/2.0");
        assert_eq!(events[1], "Ended");
        assert_eq!(e.active_calls(), 0);
    }

    /// An answered, acknowledged call and our REFER to a nurse; returns the REFER as parsed.
    fn transferring_call(e: &mut Endpoint, t0: Instant) -> Message {
        let tag = acknowledged_call(e, t0);
        assert!(e.refer(t0, "c1", "sip:nurse@192.0.2.7"));
        let refer = sent(e);
        assert_eq!(refer.len(), 1);
        let text = String::from_utf8_lossy(&refer[0]).into_owned();
        assert!(
            text.starts_with("REFER sip:patient@127.0.0.1:5070 SIP/2.0\r\n"),
            "{text}"
        );
        assert!(
            text.contains("Refer-To: <sip:nurse@192.0.2.7>\r\n"),
            "{text}"
        );
        assert!(
            text.contains(&format!(";tag={tag}")),
            "in the dialog: {text}"
        );
        message::parse(&refer[0]).expect("our REFER parses")
    }

    fn notify(cseq: u32, tag: &str, sipfrag: &str) -> Vec<u8> {
        format!(
            "NOTIFY sip:talkline@127.0.0.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP {PEER};branch=z9hG4bK-n{cseq}\r\n\
             Max-Forwards: 70\r\nFrom: <sip:patient@127.0.0.1>;tag=p1\r\n\
             To: <sip:agent@127.0.0.1>;tag={tag}\r\nCall-ID: c1\r\nCSeq: {cseq} NOTIFY\r\n\
             Event: refer\r\nContent-Type: message/sipfrag\r\nContent-Length: {}\r\n\r\n{sipfrag}",
            sipfrag.len()
        )
        .into_bytes()
    }

    #[test]
    fn a_transfer_retransmits_refer_on_timer_e_and_hangs_up_when_the_target_answers() {
        let mut e = endpoint();
        let t0 = Instant::now();
        let refer = transferring_call(&mut e, t0);
        let tag = refer.from_tag().expect("our tag").to_string();
        // Timer E: T1, 2*T1, 4*T1, then capped at T2.
        let intervals = [500, 1_000, 2_000, 4_000, 4_000];
        let at = retransmits(
            &mut e,
            t0,
            &intervals,
            "REFER sip:patient@127.0.0.1:5070 SIP/2.0",
        );
        // A second transfer while this one is under way is refused.
        assert!(!e.refer(at, "c1", "sip:nurse@192.0.2.7"));
        let accepted = message::response(&refer, 202, None, &[], None);
        e.handle_datagram(at, peer(), &accepted);
        assert!(drain(&mut e).is_empty());
        assert_eq!(e.poll_timeout(), Some(at + TRANSFER_TIMEOUT));
        e.handle_datagram(at, peer(), &notify(2, &tag, "SIP/2.0 100 Trying\r\n"));
        assert_eq!(drain(&mut e), ["SIP/2.0 200 OK"]);
        assert_eq!(e.active_calls(), 1);
        e.handle_datagram(at, peer(), &notify(3, &tag, "SIP/2.0 200 OK\r\n"));
        let events: Vec<Event> = std::iter::from_fn(|| e.poll_event()).collect();
        assert_eq!(events.len(), 3, "{events:?}");
        let first_lines: Vec<String> = events[..2]
            .iter()
            .map(|event| match event {
                Event::Send { data, .. } => String::from_utf8_lossy(data)
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            first_lines,
            ["SIP/2.0 200 OK", "BYE sip:patient@127.0.0.1:5070 SIP/2.0"]
        );
        assert!(matches!(
            &events[2],
            Event::Ended {
                reason: EndReason::Transferred,
                ..
            }
        ));
        // The final NOTIFY again, while our BYE is pending: still 200.
        e.handle_datagram(at, peer(), &notify(3, &tag, "SIP/2.0 200 OK\r\n"));
        assert_eq!(drain(&mut e), ["SIP/2.0 200 OK"]);
    }

    #[test]
    fn an_unanswered_refer_gives_up_on_timer_f_and_keeps_the_call() {
        let mut e = endpoint();
        let t0 = Instant::now();
        transferring_call(&mut e, t0);
        let mut at = t0;
        while let Some(next) = e.poll_timeout() {
            assert!(next <= t0 + TRANSACTION_TIMEOUT, "timer F bounds the REFER");
            at = next;
            e.handle_timeout(at);
        }
        assert_eq!(at, t0 + TRANSACTION_TIMEOUT);
        let events = drain(&mut e);
        assert!(
            events.iter().all(|l| l.starts_with("REFER ")),
            "no BYE: {events:?}"
        );
        assert_eq!(e.active_calls(), 1);
        // Another try is possible.
        assert!(e.refer(at, "c1", "sip:nurse@192.0.2.7"));
    }

    #[test]
    fn a_refused_or_failed_transfer_keeps_the_call() {
        let mut e = endpoint();
        let t0 = Instant::now();
        let refer = transferring_call(&mut e, t0);
        e.handle_datagram(t0, peer(), &message::response(&refer, 603, None, &[], None));
        assert!(drain(&mut e).is_empty());
        assert_eq!(e.poll_timeout(), None);
        // Accepted, then the target is busy.
        assert!(e.refer(t0, "c1", "sip:nurse@192.0.2.7"));
        let refer = message::parse(&sent(&mut e)[0]).expect("our REFER parses");
        let tag = refer.from_tag().expect("our tag").to_string();
        e.handle_datagram(t0, peer(), &message::response(&refer, 202, None, &[], None));
        e.handle_datagram(t0, peer(), &notify(2, &tag, "SIP/2.0 486 Busy Here\r\n"));
        assert_eq!(drain(&mut e), ["SIP/2.0 200 OK"]);
        assert_eq!(e.active_calls(), 1);
        assert_eq!(e.poll_timeout(), None);
    }

    #[test]
    fn an_accepted_transfer_without_a_final_notify_hangs_up_after_the_timeout() {
        let mut e = endpoint();
        let t0 = Instant::now();
        let refer = transferring_call(&mut e, t0);
        e.handle_datagram(t0, peer(), &message::response(&refer, 202, None, &[], None));
        e.handle_timeout(t0 + TRANSFER_TIMEOUT - Duration::from_millis(1));
        assert!(drain(&mut e).is_empty());
        e.handle_timeout(t0 + TRANSFER_TIMEOUT);
        assert_eq!(
            drain(&mut e),
            ["BYE sip:patient@127.0.0.1:5070 SIP/2.0", "Ended"]
        );
    }

    #[test]
    fn refer_needs_a_confirmed_call_and_stray_notifies_get_481() {
        let mut e = endpoint();
        let t0 = Instant::now();
        assert!(!e.refer(t0, "c1", "sip:nurse@192.0.2.7"));
        e.handle_datagram(t0, peer(), &notify(2, "x", "SIP/2.0 200 OK\r\n"));
        assert_eq!(
            drain(&mut e),
            ["SIP/2.0 481 Call/Transaction Does Not Exist"]
        );
        // Answered but not yet acknowledged: no REFER yet.
        answered_call(&mut e, t0);
        assert!(!e.refer(t0, "c1", "sip:nurse@192.0.2.7"));
    }

    #[test]
    fn sipfrag_status_lines_are_read_and_garbage_is_not() {
        assert_eq!(sipfrag_status(b"SIP/2.0 200 OK\r\n"), Some(200));
        assert_eq!(sipfrag_status(b"\r\nSIP/2.0 180 Ringing"), Some(180));
        assert_eq!(sipfrag_status(b"SIP/2.0 2"), None);
        assert_eq!(sipfrag_status(b"HTTP/1.1 200 OK"), None);
        assert_eq!(sipfrag_status(&[0xff, 0xfe]), None);
        assert_eq!(sipfrag_status(b""), None);
    }

    fn registering(e: &mut Endpoint, t0: Instant) -> Message {
        e.register(
            t0,
            RegisterConfig {
                aor: "sip:alice@127.0.0.1:5070".into(),
                registrar: peer(),
                username: "alice".into(),
                password: "secret".into(),
                expires: 600,
            },
        );
        let sent = sent(e);
        assert_eq!(sent.len(), 1);
        let text = String::from_utf8_lossy(&sent[0]).into_owned();
        assert!(
            text.starts_with("REGISTER sip:127.0.0.1:5070 SIP/2.0\r\n"),
            "{text}"
        );
        assert!(text.contains("Expires: 600\r\n"), "{text}");
        assert!(!text.contains("Authorization"), "{text}");
        message::parse(&sent[0]).expect("our REGISTER parses")
    }

    fn challenge(register: &Message, code: u16, nonce: &str, stale: bool) -> Vec<u8> {
        let name = if code == 407 {
            "Proxy-Authenticate"
        } else {
            "WWW-Authenticate"
        };
        let value = format!(
            "Digest realm=\"pbx\", nonce=\"{nonce}\", qop=\"auth\", algorithm=SHA-256{}",
            if stale { ", stale=true" } else { "" }
        );
        message::response(register, code, Some("registrar"), &[(name, value)], None)
    }

    #[test]
    fn register_answers_the_digest_challenge_and_refreshes_before_expiry() {
        let mut e = endpoint();
        let t0 = Instant::now();
        let first = registering(&mut e, t0);
        // Timer E retransmits the unanswered REGISTER.
        assert_eq!(e.poll_timeout(), Some(t0 + T1));
        e.handle_timeout(t0 + T1);
        assert_eq!(drain(&mut e), ["REGISTER sip:127.0.0.1:5070 SIP/2.0"]);
        e.handle_datagram(t0 + T1, peer(), &challenge(&first, 401, "n1", false));
        let second = sent(&mut e);
        assert_eq!(second.len(), 1);
        let text = String::from_utf8_lossy(&second[0]).into_owned();
        assert!(text.contains("Authorization: Digest username=\"alice\", realm=\"pbx\", nonce=\"n1\", uri=\"sip:127.0.0.1:5070\""), "{text}");
        assert!(
            text.contains("algorithm=SHA-256, qop=auth, nc=00000001, cnonce="),
            "{text}"
        );
        assert!(
            !text.contains("secret"),
            "the password never goes on the wire"
        );
        let second = message::parse(&second[0]).expect("parses");
        assert_eq!(second.cseq, first.cseq + 1);
        assert_eq!(second.call_id, first.call_id);
        // The registrar grants 300 s of the 600 asked: refresh at 240 s.
        let contact = [(
            "Contact",
            "<sip:talkline@127.0.0.1:5060>;expires=300".to_string(),
        )];
        e.handle_datagram(
            t0 + T1,
            peer(),
            &message::response(&second, 200, Some("registrar"), &contact, None),
        );
        assert!(drain(&mut e).is_empty());
        let refresh = t0 + T1 + Duration::from_secs(240);
        assert_eq!(e.poll_timeout(), Some(refresh));
        e.handle_timeout(refresh);
        let again = message::parse(&sent(&mut e)[0]).expect("a refresh");
        assert_eq!(again.cseq, second.cseq + 1);
        assert_eq!(again.call_id, first.call_id);
    }

    #[test]
    fn unregistering_asks_for_expires_0_answers_the_challenge_and_ends() {
        let mut e = endpoint();
        let t0 = Instant::now();
        let first = registering(&mut e, t0);
        e.handle_datagram(
            t0,
            peer(),
            &message::response(&first, 200, Some("r"), &[], None),
        );
        assert!(e.has_registration());
        e.unregister(t0);
        let removal = sent(&mut e);
        let text = String::from_utf8_lossy(&removal[0]).into_owned();
        assert!(text.contains("Expires: 0\r\n"), "{text}");
        let removal = message::parse(&removal[0]).expect("parses");
        e.handle_datagram(t0, peer(), &challenge(&removal, 401, "n9", false));
        let answered = sent(&mut e);
        let text = String::from_utf8_lossy(&answered[0]).into_owned();
        assert!(
            text.contains("Expires: 0\r\n") && text.contains("Authorization: Digest"),
            "{text}"
        );
        let answered = message::parse(&answered[0]).expect("parses");
        e.handle_datagram(
            t0,
            peer(),
            &message::response(&answered, 200, Some("r"), &[], None),
        );
        assert!(!e.has_registration());
        assert_eq!(
            e.poll_timeout(),
            None,
            "no refresh after the binding is gone"
        );
    }

    #[test]
    fn wrong_credentials_are_not_retried_at_once_but_after_a_while() {
        let mut e = endpoint();
        let t0 = Instant::now();
        let first = registering(&mut e, t0);
        e.handle_datagram(t0, peer(), &challenge(&first, 407, "n1", false));
        let second = sent(&mut e);
        assert!(String::from_utf8_lossy(&second[0]).contains("Proxy-Authorization: Digest"));
        let second = message::parse(&second[0]).expect("parses");
        // Challenged again with a fresh nonce, not stale: the password is wrong.
        e.handle_datagram(t0, peer(), &challenge(&second, 407, "n2", false));
        assert!(drain(&mut e).is_empty());
        assert_eq!(e.poll_timeout(), Some(t0 + REGISTER_RETRY));
        e.handle_timeout(t0 + REGISTER_RETRY);
        let retry = sent(&mut e);
        assert!(!String::from_utf8_lossy(&retry[0]).contains("Authorization"));
    }

    #[test]
    fn a_stale_nonce_is_answered_again_and_a_silent_registrar_is_retried_later() {
        let mut e = endpoint();
        let t0 = Instant::now();
        let first = registering(&mut e, t0);
        e.handle_datagram(t0, peer(), &challenge(&first, 401, "n1", false));
        let second = message::parse(&sent(&mut e)[0]).expect("parses");
        e.handle_datagram(t0, peer(), &challenge(&second, 401, "n2", true));
        let third = sent(&mut e);
        assert!(String::from_utf8_lossy(&third[0]).contains("nonce=\"n2\""));
        // No answer at all: timer F, then a retry after REGISTER_RETRY.
        let mut at = t0;
        while let Some(next) = e.poll_timeout() {
            if next > t0 + TRANSACTION_TIMEOUT {
                break;
            }
            at = next;
            e.handle_timeout(at);
        }
        assert_eq!(at, t0 + TRANSACTION_TIMEOUT);
        assert_eq!(e.poll_timeout(), Some(at + REGISTER_RETRY));
        // A challenge in a garbled header is not answered.
        drain(&mut e);
        e.handle_timeout(at + REGISTER_RETRY);
        let fourth = message::parse(&sent(&mut e)[0]).expect("parses");
        let garbled = message::response(
            &fourth,
            401,
            None,
            &[("WWW-Authenticate", "Digest \"\"".into())],
            None,
        );
        e.handle_datagram(at, peer(), &garbled);
        assert!(drain(&mut e).is_empty());
    }
}
