//! RTP (RFC 3550) packets for G.711 audio, and RFC 4733 telephone events (DTMF). Parsing never
//! panics: anything short or of another version is `None`.

/// Fixed RTP header length; CSRCs and extensions come after it.
const HEADER_LEN: usize = 12;
const VERSION: u8 = 2;

/// One received RTP packet, borrowed from the datagram.
#[derive(Debug, PartialEq, Eq)]
pub struct RtpPacket<'a> {
    pub payload_type: u8,
    pub marker: bool,
    pub sequence: u16,
    pub timestamp: u32,
    pub ssrc: u32,
    pub payload: &'a [u8],
}

pub fn parse(datagram: &[u8]) -> Option<RtpPacket<'_>> {
    if datagram.len() < HEADER_LEN || datagram[0] >> 6 != VERSION {
        return None;
    }
    let padding = datagram[0] & 0x20 != 0;
    let has_extension = datagram[0] & 0x10 != 0;
    let csrc_count = (datagram[0] & 0x0F) as usize;
    let mut start = HEADER_LEN + 4 * csrc_count;
    if has_extension {
        let words = datagram.get(start + 2..start + 4)?;
        start += 4 + 4 * u16::from_be_bytes([words[0], words[1]]) as usize;
    }
    let mut end = datagram.len();
    if padding {
        end = end.checked_sub(*datagram.last()? as usize)?;
    }
    let payload = datagram.get(start..end)?;
    Some(RtpPacket {
        payload_type: datagram[1] & 0x7F,
        marker: datagram[1] & 0x80 != 0,
        sequence: u16::from_be_bytes([datagram[2], datagram[3]]),
        timestamp: u32::from_be_bytes([datagram[4], datagram[5], datagram[6], datagram[7]]),
        ssrc: u32::from_be_bytes([datagram[8], datagram[9], datagram[10], datagram[11]]),
        payload,
    })
}

/// The sending side of one RTP stream: sequence numbers, timestamps and the SSRC.
pub struct RtpSender {
    payload_type: u8,
    ssrc: u32,
    sequence: u16,
    timestamp: u32,
    /// The first packet after a silence (and the very first) carries the marker bit.
    marker_next: bool,
}

impl RtpSender {
    /// Starting sequence number and timestamp are random (RFC 3550 section 5.1), from `seed`.
    pub fn new(payload_type: u8, seed: u64) -> Self {
        Self {
            payload_type,
            ssrc: (seed >> 32) as u32 ^ seed as u32,
            sequence: (seed >> 16) as u16,
            timestamp: (seed >> 8) as u32,
            marker_next: true,
        }
    }

    pub fn ssrc(&self) -> u32 {
        self.ssrc
    }

    /// One packet of `payload`, which covers `samples` sampling periods.
    pub fn packet(&mut self, payload: &[u8], samples: u32) -> Vec<u8> {
        let mut packet = Vec::with_capacity(HEADER_LEN + payload.len());
        packet.push(VERSION << 6);
        packet.push(self.payload_type | if self.marker_next { 0x80 } else { 0 });
        packet.extend_from_slice(&self.sequence.to_be_bytes());
        packet.extend_from_slice(&self.timestamp.to_be_bytes());
        packet.extend_from_slice(&self.ssrc.to_be_bytes());
        packet.extend_from_slice(payload);
        self.marker_next = false;
        self.sequence = self.sequence.wrapping_add(1);
        self.timestamp = self.timestamp.wrapping_add(samples);
        packet
    }

    /// Time passes without packets (hold): the timestamp keeps counting, the next packet is
    /// marked as the start of a talkspurt.
    pub fn skip(&mut self, samples: u32) {
        self.timestamp = self.timestamp.wrapping_add(samples);
        self.marker_next = true;
    }
}

/// A DTMF key, from RFC 4733's event codes 0-15.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DtmfDigit(pub char);

fn event_char(event: u8) -> Option<char> {
    match event {
        0..=9 => Some((b'0' + event) as char),
        10 => Some('*'),
        11 => Some('#'),
        12..=15 => Some((b'A' + event - 12) as char),
        _ => None,
    }
}

/// Turns telephone-event packets into digits, once each. A sender repeats every event's packets
/// while the key is down and sends the end packet three times; all carry the same RTP
/// timestamp (the event's start), which is what identifies one key press.
#[derive(Default)]
pub struct DtmfDetector {
    last_reported: Option<u32>,
}

impl DtmfDetector {
    /// The digit, the first time an end packet of a new event arrives.
    pub fn push(&mut self, timestamp: u32, payload: &[u8]) -> Option<DtmfDigit> {
        let [event, flags, ..] = *payload else {
            return None;
        };
        if payload.len() < 4 || flags & 0x80 == 0 || self.last_reported == Some(timestamp) {
            return None;
        }
        let digit = event_char(event)?;
        self.last_reported = Some(timestamp);
        Some(DtmfDigit(digit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_built_packet_parses_back_with_advancing_sequence_and_timestamp() {
        let mut sender = RtpSender::new(8, 0x1234_5678_9ABC_DEF0);
        let first = sender.packet(&[0xD5; 160], 160);
        let second = sender.packet(&[0xD5; 160], 160);
        let a = parse(&first).expect("valid packet");
        let b = parse(&second).expect("valid packet");
        assert_eq!(first.len(), 172);
        assert_eq!((a.payload_type, a.marker), (8, true));
        assert!(!b.marker);
        assert_eq!(b.sequence, a.sequence.wrapping_add(1));
        assert_eq!(b.timestamp, a.timestamp.wrapping_add(160));
        assert_eq!((a.ssrc, b.ssrc), (sender.ssrc(), sender.ssrc()));
        assert_eq!(a.payload, &[0xD5; 160][..]);
    }

    #[test]
    fn sequence_and_timestamp_wrap() {
        let mut sender = RtpSender::new(0, 0);
        sender.sequence = u16::MAX;
        sender.timestamp = u32::MAX - 10;
        sender.packet(&[0; 160], 160);
        let next = sender.packet(&[0; 160], 160);
        let p = parse(&next).expect("valid packet");
        assert_eq!((p.sequence, p.timestamp), (0, 149));
    }

    #[test]
    fn malformed_packets_are_rejected_without_panicking() {
        assert_eq!(parse(&[]), None);
        assert_eq!(parse(&[0x80; 11]), None);
        // Version 1.
        assert_eq!(parse(&[0x40; 20]), None);
        // 15 CSRCs announced, none present.
        assert_eq!(parse(&[0x8F; 20]), None);
        // An extension longer than the packet.
        let mut ext = vec![
            0x90, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0xBE, 0xDE, 0xFF, 0xFF,
        ];
        assert_eq!(parse(&ext), None);
        // Padding longer than the packet.
        ext = vec![0xA0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 200];
        assert_eq!(parse(&ext), None);
    }

    #[test]
    fn dtmf_end_packets_give_one_digit_per_key_press() {
        let mut detector = DtmfDetector::default();
        // Key 5 down (no end bit), then three end packets, all with the event's timestamp.
        assert_eq!(detector.push(1000, &[5, 0x0A, 0, 160]), None);
        assert_eq!(detector.push(1000, &[5, 0x8A, 3, 32]), Some(DtmfDigit('5')));
        assert_eq!(detector.push(1000, &[5, 0x8A, 3, 32]), None);
        assert_eq!(detector.push(1000, &[5, 0x8A, 3, 32]), None);
        // The next press of the same key is a new event: a new timestamp.
        assert_eq!(detector.push(2600, &[5, 0x8A, 3, 32]), Some(DtmfDigit('5')));
        assert_eq!(
            detector.push(4200, &[11, 0x8A, 3, 32]),
            Some(DtmfDigit('#'))
        );
        assert_eq!(
            detector.push(5800, &[10, 0x8A, 3, 32]),
            Some(DtmfDigit('*'))
        );
        // Unknown events and short payloads are ignored.
        assert_eq!(detector.push(7400, &[200, 0x8A, 3, 32]), None);
        assert_eq!(detector.push(9000, &[1, 0x8A]), None);
    }
}
