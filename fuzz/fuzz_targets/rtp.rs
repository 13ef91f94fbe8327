//! RTP datagrams into the packet parser. Round trip: a parsed packet written back as a plain
//! header (no CSRCs, extension or padding) plus its payload parses to the same fields.
#![no_main]
use libfuzzer_sys::fuzz_target;
use talkline_runtime::sip::rtp;

fuzz_target!(|data: &[u8]| {
    let Some(packet) = rtp::parse(data) else {
        return;
    };
    assert!(packet.payload_type < 128);
    assert!(packet.payload.len() + 12 <= data.len());
    let mut written = vec![
        0x80,
        packet.payload_type | if packet.marker { 0x80 } else { 0 },
    ];
    written.extend_from_slice(&packet.sequence.to_be_bytes());
    written.extend_from_slice(&packet.timestamp.to_be_bytes());
    written.extend_from_slice(&packet.ssrc.to_be_bytes());
    written.extend_from_slice(packet.payload);
    let back = rtp::parse(&written).expect("a plain packet we wrote parses");
    assert_eq!(back, packet);
});
