//! The agent's synthesized audio between the TTS and the paced output: a fixed ring (ringbuf),
//! allocated once per session, that the control loop fills and drains 20 ms at a time.
//!
//! Policy when full: nothing is dropped in normal operation. The control loop only takes audio
//! from the reply threads while a whole chunk fits ([`AgentAudio::has_room_for_a_chunk`]); until
//! then the reply threads wait on their bounded channel, so a TTS faster than real time is held
//! back instead of growing the queue. Audio that would still overflow (a bug, or a chunk beyond
//! the chunker's bound) is dropped and counted, never blocking the audio path.

use ringbuf::traits::{Consumer, Observer, Producer};
use ringbuf::HeapRb;

/// Agent audio a session holds ahead of playback.
pub const AGENT_AUDIO_QUEUE_S: f64 = 45.0;

/// Room that must be free before the control loop takes another chunk of audio: more than one
/// chunk can hold (the chunker cuts at 300 characters, about 20 s spoken).
pub const CHUNK_HEADROOM_S: f64 = 25.0;

pub struct AgentAudio {
    ring: HeapRb<f32>,
    headroom: usize,
    dropped: u64,
}

impl AgentAudio {
    pub fn new(rate: u32) -> Self {
        let samples = |s: f64| (s * rate as f64).ceil() as usize;
        AgentAudio {
            ring: HeapRb::new(samples(AGENT_AUDIO_QUEUE_S).max(1)),
            headroom: samples(CHUNK_HEADROOM_S),
            dropped: 0,
        }
    }

    /// Queues `samples`; what does not fit is dropped and counted.
    pub fn push(&mut self, samples: &[f32]) {
        let pushed = self.ring.push_slice(samples);
        self.dropped += (samples.len() - pushed) as u64;
    }

    /// Whether `samples` more fit.
    pub fn fits(&self, samples: usize) -> bool {
        self.ring.vacant_len() >= samples
    }

    /// Whether the loop may take another chunk from the reply threads.
    pub fn has_room_for_a_chunk(&self) -> bool {
        self.fits(self.headroom)
    }

    /// Moves up to `out.len()` samples into `out`; returns how many.
    pub fn pop_into(&mut self, out: &mut [f32]) -> usize {
        self.ring.pop_slice(out)
    }

    /// Drops everything queued (barge-in).
    pub fn clear(&mut self) {
        self.ring.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.ring.is_empty()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.ring.occupied_len()
    }

    /// Samples lost to overflow.
    pub fn dropped_samples(&self) -> u64 {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audio_comes_out_in_order_and_overflow_is_counted_not_blocking() {
        let mut q = AgentAudio::new(10); // 450 samples, headroom 250
        assert!(q.has_room_for_a_chunk());
        q.push(&(0..300).map(|i| i as f32).collect::<Vec<_>>());
        assert!(!q.has_room_for_a_chunk(), "150 free < 250 headroom");
        let mut frame = [0.0; 200];
        assert_eq!(q.pop_into(&mut frame), 200);
        assert_eq!(frame[199], 199.0);
        q.push(&vec![1.0; 400]); // 100 queued + 400 > 450
        assert_eq!(q.len(), 450);
        assert_eq!(q.dropped_samples(), 50);
        q.clear();
        assert!(q.is_empty());
    }
}
