//! G.711 at 8 kHz: μ-law (PCMU, payload type 0, shared with the Twilio transport) and A-law
//! (PCMA, payload type 8). A-law by hand for the same reason as μ-law: a few lines of a fixed
//! ITU-T standard are simpler than a dependency.

pub use crate::twilio::{mulaw_decode, mulaw_encode};

/// The two G.711 laws, as negotiated in SDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Law {
    Mu,
    A,
}

impl Law {
    pub fn payload_type(self) -> u8 {
        match self {
            Law::Mu => 0,
            Law::A => 8,
        }
    }

    pub fn encoding_name(self) -> &'static str {
        match self {
            Law::Mu => "PCMU",
            Law::A => "PCMA",
        }
    }

    pub fn encode(self, sample: i16) -> u8 {
        match self {
            Law::Mu => mulaw_encode(sample),
            Law::A => alaw_encode(sample),
        }
    }

    pub fn decode(self, byte: u8) -> i16 {
        match self {
            Law::Mu => mulaw_decode(byte),
            Law::A => alaw_decode(byte),
        }
    }

    /// The byte that decodes to (near) zero: what a lost packet is concealed with.
    pub fn silence(self) -> u8 {
        self.encode(0)
    }
}

/// Even bits are inverted on the wire (G.711 section 3), so a line of zeros is not silence.
const ALAW_TOGGLE: u8 = 0x55;

pub fn alaw_encode(sample: i16) -> u8 {
    // A-law works on 13-bit magnitudes.
    let (sign, magnitude) = if sample >= 0 {
        (0x80u8, (sample as i32) >> 3)
    } else {
        (0x00u8, (-(sample as i32) - 1) >> 3)
    };
    let code = if magnitude < 32 {
        (magnitude >> 1) as u8
    } else {
        let segment = (31 - (magnitude as u32).leading_zeros()) as i32 - 4;
        let segment = segment.clamp(1, 7);
        let mantissa = (magnitude >> segment) & 0x0F;
        ((segment << 4) as u8) | mantissa as u8
    };
    (sign | code) ^ ALAW_TOGGLE
}

pub fn alaw_decode(byte: u8) -> i16 {
    let a = byte ^ ALAW_TOGGLE;
    let segment = ((a >> 4) & 0x07) as i32;
    let mantissa = (a & 0x0F) as i32;
    let magnitude = if segment == 0 {
        (mantissa << 4) + 8
    } else {
        ((mantissa << 4) + 0x108) << (segment - 1)
    };
    (if a & 0x80 != 0 { magnitude } else { -magnitude }) as i16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alaw_matches_g711_reference_points() {
        // From the ITU-T G.711 tables (and Sun's g711.c, which every implementation copies).
        assert_eq!(alaw_encode(0), 0xD5);
        assert_eq!(alaw_encode(-1), 0x55);
        assert_eq!(alaw_encode(32_767), 0xAA);
        assert_eq!(alaw_encode(-32_768), 0x2A);
        assert_eq!(alaw_decode(0xD5), 8);
        assert_eq!(alaw_decode(0x55), -8);
        assert_eq!(alaw_decode(0xAA), 32_256);
        assert_eq!(alaw_decode(0x2A), -32_256);
    }

    #[test]
    fn alaw_round_trips_within_its_step() {
        for s in (-32_768i32..=32_767).step_by(61) {
            let back = alaw_decode(alaw_encode(s as i16)) as i32;
            let tolerance = (s.abs() / 16).max(16) + 8;
            assert!((back - s).abs() <= tolerance, "{s} -> {back}");
        }
    }

    #[test]
    fn silence_decodes_to_near_zero_in_both_laws() {
        for law in [Law::Mu, Law::A] {
            assert!(law.decode(law.silence()).abs() <= 8, "{law:?}");
        }
    }
}
