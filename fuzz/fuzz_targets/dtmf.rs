//! RFC 4733 telephone events: a stream of RTP packets through the parser into the DTMF detector,
//! as the media task does for the negotiated telephone-event payload type. Round trip: an event
//! written back as a 4-byte payload (event, E bit, volume, duration) gives the same digit to a
//! fresh detector.
#![no_main]
use libfuzzer_sys::fuzz_target;
use talkline_runtime::sip::rtp::{self, DtmfDetector, DtmfDigit};

const KEYS: &str = "0123456789*#ABCD";

fuzz_target!(|data: &[u8]| {
    let mut detector = DtmfDetector::default();
    let mut last: Option<u32> = None;
    // Datagrams of at most 64 bytes, each prefixed by its length.
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let len = (len as usize % 64).min(tail.len());
        let (datagram, tail) = tail.split_at(len);
        rest = tail;
        let Some(packet) = rtp::parse(datagram) else {
            continue;
        };
        let Some(DtmfDigit(key)) = detector.push(packet.timestamp, packet.payload) else {
            continue;
        };
        let payload = packet.payload;
        assert!(
            payload.len() >= 4 && payload[1] & 0x80 != 0,
            "a digit from a non-end packet"
        );
        assert_eq!(KEYS.chars().nth(payload[0] as usize), Some(key));
        assert_ne!(last, Some(packet.timestamp), "one key press reported twice");
        last = Some(packet.timestamp);
        let written = [
            payload[0],
            0x80 | (payload[1] & 0x3F),
            payload[2],
            payload[3],
        ];
        let again = DtmfDetector::default().push(packet.timestamp, &written);
        assert_eq!(again, Some(DtmfDigit(key)));
    }
});
