//! The scripted caller as a SIP phone: a real call over UDP to the server's SIP listener
//! (INVITE, ACK, BYE through the same sans-I/O [`Endpoint`] the server uses, so the bench
//! exercises the server's side of the dialog, not its own), the caller's voice as G.711 RTP at
//! 8 kHz, and the agent's RTP back. There is no event channel: the caller sees only whether each
//! agent packet was audible.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::link::AUDIBLE;
use crate::sip::endpoint::{EndReason, Endpoint, Event, LocalAddresses};
use crate::sip::g711::Law;
use crate::sip::message::MAX_DATAGRAM;
use crate::sip::rtp::{self, RtpSender};
use crate::sip::sdp::RemoteMedia;

/// Longest wait for the 200 OK. The server answers at once or refuses (503 when full); a
/// server that does neither is broken, and the endpoint's own timer B would take 32 s to say so.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long hanging up waits for the BYE's 200 (retransmitting it meanwhile).
const BYE_LINGER: Duration = Duration::from_secs(2);
/// Agent packets waiting for the caller's loop (audible or not), 20 s of audio. Policy when
/// full: the packet is dropped and the analysis sees a gap; the socket reader never blocks.
const INCOMING_QUEUE: usize = 1_000;
/// Largest RTP datagram read; G.711 packets of 20 ms are 172 bytes.
const MAX_RTP: usize = 1_500;

pub struct SipLink {
    rtp: Arc<UdpSocket>,
    /// Where the server's SDP answer said to send; the server sends from the same port.
    remote_rtp: SocketAddr,
    law: Law,
    sender: RtpSender,
    decimator: Decimator,
    /// Per agent packet: whether it was audible.
    incoming: mpsc::Receiver<bool>,
    /// The call is over (the server hung up, or the signalling gave up).
    ended: CancellationToken,
    /// Ours to cancel: hang up with BYE.
    hang_up: CancellationToken,
    signalling: Option<JoinHandle<()>>,
    receiver: JoinHandle<()>,
}

impl Drop for SipLink {
    fn drop(&mut self) {
        // The client always hangs up first; this only keeps a failed caller's tasks from
        // outliving it.
        if let Some(task) = &self.signalling {
            task.abort();
        }
        self.receiver.abort();
    }
}

impl SipLink {
    /// Calls `sip:agent@addr` and returns once the call is answered.
    pub async fn connect(addr: &str) -> anyhow::Result<SipLink> {
        let peer = tokio::net::lookup_host(addr)
            .await
            .with_context(|| format!("resolving the SIP server {addr}"))?
            .next()
            .with_context(|| format!("{addr} has no address"))?;
        let ip = source_ip(peer)?;
        let sip = UdpSocket::bind(SocketAddr::new(ip, 0))
            .await
            .context("binding the caller's SIP socket")?;
        let rtp = Arc::new(
            UdpSocket::bind(SocketAddr::new(ip, 0))
                .await
                .context("binding the caller's RTP socket")?,
        );
        let local = LocalAddresses {
            sip: sip.local_addr()?,
            media_ip: ip,
        };
        let seed = entropy(&sip);
        let mut endpoint = Endpoint::new(local, seed);
        let call = endpoint.call(
            Instant::now(),
            &format!("sip:agent@{peer}"),
            peer,
            rtp.local_addr()?.port(),
        );
        let (answered_tx, answered) = oneshot::channel();
        let (ended, hang_up) = (CancellationToken::new(), CancellationToken::new());
        let signalling = tokio::spawn(signalling(
            endpoint,
            sip,
            call,
            answered_tx,
            ended.clone(),
            hang_up.clone(),
        ));
        let remote = match tokio::time::timeout(ANSWER_TIMEOUT, answered).await {
            Ok(Ok(Ok(remote))) => remote,
            Ok(Ok(Err(reason))) => {
                let _ = signalling.await;
                bail!("the SIP call to {peer} failed: {reason:?}");
            }
            Ok(Err(_)) => {
                let _ = signalling.await;
                bail!("the SIP signalling to {peer} stopped before an answer");
            }
            Err(_) => {
                hang_up.cancel();
                let _ = signalling.await;
                bail!("no answer from {peer} within {ANSWER_TIMEOUT:?}");
            }
        };
        if !remote.peer_receives() {
            hang_up.cancel();
            let _ = signalling.await;
            bail!("the server answered without receiving audio ({remote:?})");
        }
        let crate::sip::sdp::Codec::G711(law) = remote.codec else {
            hang_up.cancel();
            let _ = signalling.await;
            bail!(
                "the server answered {:?}; this caller offered G.711 only",
                remote.codec
            );
        };
        let (incoming_tx, incoming) = mpsc::channel(INCOMING_QUEUE);
        let receiver = tokio::spawn(receive(rtp.clone(), law, incoming_tx));
        Ok(SipLink {
            rtp,
            remote_rtp: remote.rtp,
            law,
            sender: RtpSender::new(law.payload_type(), seed.rotate_left(17)),
            decimator: Decimator::new(),
            incoming,
            ended,
            hang_up,
            signalling: Some(signalling),
            receiver,
        })
    }

    /// One 20 ms frame of 16 kHz caller audio, sent as one 8 kHz G.711 packet.
    pub async fn send(&mut self, frame: &[i16]) -> anyhow::Result<()> {
        let narrow = self.decimator.push(frame);
        let payload: Vec<u8> = narrow.iter().map(|&s| self.law.encode(s)).collect();
        let packet = self.sender.packet(&payload, narrow.len() as u32);
        self.rtp
            .send_to(&packet, self.remote_rtp)
            .await
            .context("sending RTP")?;
        Ok(())
    }

    /// Whether the next agent packet was audible; `None` once the call is over. Cancel-safe.
    pub async fn recv(&mut self) -> Option<bool> {
        tokio::select! {
            biased;
            audible = self.incoming.recv() => audible,
            _ = self.ended.cancelled() => None,
        }
    }

    /// BYE, and a short wait for its answer.
    pub async fn hang_up(&mut self) {
        self.hang_up.cancel();
        if let Some(task) = self.signalling.take() {
            let _ = tokio::time::timeout(BYE_LINGER + Duration::from_secs(1), task).await;
        }
        self.receiver.abort();
    }
}

/// The local address the kernel would send to `peer` from: what goes into Via, Contact and SDP.
fn source_ip(peer: SocketAddr) -> anyhow::Result<IpAddr> {
    let any: SocketAddr = if peer.is_ipv4() {
        (IpAddr::from([0u8; 4]), 0).into()
    } else {
        (IpAddr::from([0u16; 8]), 0).into()
    };
    let probe = std::net::UdpSocket::bind(any)?;
    probe
        .connect(peer)
        .with_context(|| format!("no route to {peer}"))?;
    Ok(probe.local_addr()?.ip())
}

/// Tags, branches, Call-IDs and the RTP stream must differ between concurrent callers.
fn entropy(socket: &UdpSocket) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let port = socket.local_addr().map_or(0, |a| u64::from(a.port()));
    nanos ^ (port << 40) ^ u64::from(std::process::id())
}

/// The call's SIP dialog: INVITE until answered, the ACK, the server's BYE or ours.
async fn signalling(
    mut endpoint: Endpoint,
    socket: UdpSocket,
    call: String,
    answered: oneshot::Sender<Result<RemoteMedia, EndReason>>,
    ended: CancellationToken,
    hang_up: CancellationToken,
) {
    let mut answered = Some(answered);
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut linger_until: Option<Instant> = None;
    loop {
        let mut over = false;
        while let Some(event) = endpoint.poll_event() {
            match event {
                Event::Send { to, data } => {
                    if let Err(e) = socket.send_to(&data, to.addr).await {
                        tracing::debug!("bench SIP send to {to}: {e}");
                    }
                }
                Event::Answered { remote, .. } => {
                    if let Some(tx) = answered.take() {
                        let _ = tx.send(Ok(remote));
                    }
                }
                Event::Ended { reason, .. } => {
                    if let Some(tx) = answered.take() {
                        let _ = tx.send(Err(reason));
                    }
                    ended.cancel();
                    // After our BYE the dialog lives on until its 200; otherwise it is gone.
                    over = reason != EndReason::LocalBye;
                }
                // A caller takes no calls and the server does not re-INVITE.
                Event::Incoming { call: other, .. } => {
                    endpoint.reject(Instant::now(), &other, false)
                }
                Event::MediaChanged { .. } => {}
            }
        }
        if over || linger_until.is_some_and(|t| endpoint.active_calls() == 0 || Instant::now() >= t)
        {
            return;
        }
        let now = Instant::now();
        let wake = endpoint
            .poll_timeout()
            .unwrap_or(now + Duration::from_secs(1))
            .min(linger_until.unwrap_or(now + Duration::from_secs(1)));
        tokio::select! {
            _ = hang_up.cancelled(), if linger_until.is_none() => {
                endpoint.hang_up(now, &call);
                linger_until = Some(now + BYE_LINGER);
            }
            received = socket.recv_from(&mut buf) => match received {
                Ok((n, from)) => endpoint.handle_datagram(Instant::now(), from, &buf[..n]),
                // ICMP port unreachable from an earlier send surfaces here on Linux.
                Err(e) => tracing::debug!("bench SIP receive: {e}"),
            },
            _ = tokio::time::sleep_until(wake.into()) => endpoint.handle_timeout(Instant::now()),
        }
    }
}

/// The agent's RTP: one audibility verdict per packet of the negotiated law (RFC 4733 events and
/// anything else are not agent speech).
async fn receive(rtp: Arc<UdpSocket>, law: Law, incoming: mpsc::Sender<bool>) {
    let mut buf = vec![0u8; MAX_RTP];
    loop {
        let Ok((n, _)) = rtp.recv_from(&mut buf).await else {
            // ICMP errors from our own sends after the server has gone; the call's end is
            // signalled by SIP.
            continue;
        };
        let Some(packet) = rtp::parse(&buf[..n]) else {
            continue;
        };
        if packet.payload_type != law.payload_type() {
            continue;
        }
        let audible = packet
            .payload
            .iter()
            .any(|&b| (f32::from(law.decode(b)) / 32_768.0).abs() > AUDIBLE);
        if let Err(mpsc::error::TrySendError::Closed(_)) = incoming.try_send(audible) {
            return;
        }
    }
}

/// Taps of the 16 -> 8 kHz low-pass (odd, so the filter is linear-phase with a whole-sample
/// delay).
const TAPS: usize = 31;
/// Cutoff as a fraction of 16 kHz: 3.6 kHz, inside the telephone band and far enough below the
/// 4 kHz Nyquist frequency of 8 kHz for 31 taps to suppress what would alias.
const CUTOFF: f64 = 3_600.0 / 16_000.0;

/// 16 kHz to 8 kHz, continuous across frames: a Hamming-windowed sinc low-pass, then every other
/// sample. Streaming and short on purpose: it delays the caller's voice by (TAPS - 1) / 2 = 15
/// samples at 16 kHz (under 1 ms), where a block resampler would add tens of milliseconds to
/// every voice-to-voice figure.
struct Decimator {
    taps: [f32; TAPS],
    /// The last TAPS - 1 input samples, then the frame being filtered.
    history: Vec<f32>,
}

impl Decimator {
    fn new() -> Self {
        let mut taps = [0f32; TAPS];
        let mid = (TAPS - 1) as f64 / 2.0;
        for (j, tap) in taps.iter_mut().enumerate() {
            let x = j as f64 - mid;
            let sinc = if x == 0.0 {
                2.0 * CUTOFF
            } else {
                (2.0 * std::f64::consts::PI * CUTOFF * x).sin() / (std::f64::consts::PI * x)
            };
            let window =
                0.54 - 0.46 * (2.0 * std::f64::consts::PI * j as f64 / (TAPS - 1) as f64).cos();
            *tap = (sinc * window) as f32;
        }
        // Unity gain at 0 Hz, so speech keeps its level through the filter.
        let sum: f32 = taps.iter().sum();
        for tap in &mut taps {
            *tap /= sum;
        }
        Self {
            taps,
            history: vec![0.0; TAPS - 1],
        }
    }

    /// Half as many samples out as in; frames of even length keep the phase.
    fn push(&mut self, frame: &[i16]) -> Vec<i16> {
        self.history.extend(frame.iter().map(|&s| f32::from(s)));
        let out = (TAPS - 1..self.history.len())
            .step_by(2)
            .map(|n| {
                let acc: f32 = self
                    .taps
                    .iter()
                    .enumerate()
                    .map(|(j, t)| t * self.history[n - j])
                    .sum();
                acc.round().clamp(f32::from(i16::MIN), f32::from(i16::MAX)) as i16
            })
            .collect();
        let keep = self.history.len() - (TAPS - 1);
        self.history.drain(..keep);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(freq: f64, samples: usize) -> Vec<i16> {
        (0..samples)
            .map(|i| {
                (8_000.0 * (2.0 * std::f64::consts::PI * freq * i as f64 / 16_000.0).sin()) as i16
            })
            .collect()
    }

    fn rms(samples: &[i16]) -> f64 {
        (samples.iter().map(|&s| f64::from(s).powi(2)).sum::<f64>() / samples.len() as f64).sqrt()
    }

    /// Speech-band audio passes at its level; what would fold back into the band is removed.
    #[test]
    fn the_decimator_keeps_the_telephone_band_and_removes_what_would_alias() {
        let through = |freq: f64| {
            let mut d = Decimator::new();
            let input = tone(freq, 16_000);
            let out: Vec<i16> = input.chunks(320).flat_map(|f| d.push(f)).collect();
            assert_eq!(out.len(), 8_000);
            // Skip the filter's start-up.
            rms(&out[100..]) / rms(&input)
        };
        assert!((through(500.0) - 1.0).abs() < 0.02, "{}", through(500.0));
        assert!(through(2_000.0) > 0.95, "{}", through(2_000.0));
        assert!(through(6_000.0) < 0.01, "{}", through(6_000.0));
    }

    /// Frames are filtered as one stream: no seam where one ends and the next begins.
    #[test]
    fn the_decimator_is_continuous_across_frames() {
        let input = tone(440.0, 3_200);
        let mut whole = Decimator::new();
        let one = whole.push(&input);
        let mut framed = Decimator::new();
        let many: Vec<i16> = input.chunks(320).flat_map(|f| framed.push(f)).collect();
        assert_eq!(one, many);
    }
}
