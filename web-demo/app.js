// talkline's browser demo: one WebRTC call to `talkline serve`.
// Signaling is WHIP-style: POST the offer (ICE gathered in) to /webrtc/offer, get the answer,
// DELETE the returned Location to hang up. Events arrive on the "events" data channel.
"use strict";

const $ = (id) => document.getElementById(id);
const GATHER_TIMEOUT_MS = 2000;

// What the page saw, for people and for the end-to-end test.
const talkline = (window.talkline = {
  state: "idle",
  finals: [],
  turns: [],
  agentPeak: 0,
  error: null,
});

let call = null;

function setState(state, text) {
  talkline.state = state;
  $("status").dataset.state = state;
  $("status").textContent = text;
  $("call").disabled = state === "connecting" || state === "live";
  $("hangup").disabled = !(state === "connecting" || state === "live");
}

function showError(message) {
  talkline.error = message;
  $("error").textContent = message;
  $("error").hidden = false;
}

function addLine(kind, text, interrupted) {
  const li = document.createElement("li");
  li.className = kind + (interrupted ? " interrupted" : "");
  li.textContent = text;
  $("turns").appendChild(li);
  li.scrollIntoView({ block: "nearest" });
}

function ms(value) {
  return typeof value === "number" ? `${Math.round(value)} ms` : "–";
}

function onEvent(event) {
  switch (event.type) {
    case "partial": {
      const p = $("partial");
      p.textContent = event.committed ? event.committed + " " : "";
      const t = document.createElement("span");
      t.className = "tentative";
      t.textContent = event.tentative || "";
      p.appendChild(t);
      break;
    }
    case "final":
      talkline.finals.push(event.text);
      $("partial").textContent = "";
      addLine("user", event.text);
      break;
    case "turn":
      talkline.turns.push(event);
      if (event.agent_text) addLine("agent", event.agent_text, event.interrupted);
      $("v2v").textContent = ms(event.voice_to_voice_ms);
      $("asr").textContent = ms(event.asr_final_ms);
      $("llm").textContent = ms(event.llm_first_token_ms);
      $("tts").textContent = ms(event.tts_first_audio_ms);
      $("spec").textContent = event.speculative;
      break;
    case "error":
      showError(`The agent reported a problem: ${event.message}`);
      break;
    case "bye":
      hangUp(`Call ended by the agent (${event.reason}).`);
      break;
  }
}

// A bar that follows the RMS level of a stream.
function meter(context, stream, bar, onLevel) {
  const analyser = context.createAnalyser();
  analyser.fftSize = 1024;
  context.createMediaStreamSource(stream).connect(analyser);
  const samples = new Float32Array(analyser.fftSize);
  const timer = setInterval(() => {
    analyser.getFloatTimeDomainData(samples);
    let sum = 0;
    for (const s of samples) sum += s * s;
    const rms = Math.sqrt(sum / samples.length);
    if (onLevel) onLevel(rms);
    bar.style.width = `${Math.min(100, rms * 400)}%`;
  }, 50);
  return () => {
    clearInterval(timer);
    bar.style.width = "0";
  };
}

function iceGathered(pc) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      if (pc.iceGatheringState === "complete") resolve();
    };
    pc.addEventListener("icegatheringstatechange", done);
    // Host candidates come at once; do not wait for slow STUN/TURN forever.
    setTimeout(resolve, GATHER_TIMEOUT_MS);
  });
}

async function startCall() {
  $("error").hidden = true;
  talkline.error = null;
  setState("connecting", "Asking for the microphone…");
  let mic;
  try {
    mic = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
  } catch (e) {
    setState("idle", "Ready");
    showError(
      e.name === "NotAllowedError"
        ? "Microphone permission was denied. Allow it in the address bar and press Call again."
        : `No microphone could be opened (${e.name}). Plug one in and press Call again.`,
    );
    return;
  }
  setState("connecting", "Connecting…");
  const pc = new RTCPeerConnection();
  const context = new AudioContext();
  const current = (call = { pc, mic, context, stops: [], location: null });
  current.stops.push(meter(context, mic, $("mic-level")));
  mic.getTracks().forEach((track) => pc.addTrack(track, mic));
  const events = pc.createDataChannel("events");
  events.onmessage = (m) => {
    try {
      onEvent(JSON.parse(m.data));
    } catch (e) {
      console.warn("ignored an event that was not JSON", e);
    }
  };
  current.events = events;
  pc.ontrack = (e) => {
    const stream = e.streams[0] || new MediaStream([e.track]);
    const audio = new Audio();
    audio.autoplay = true;
    audio.srcObject = stream;
    current.audio = audio;
    current.stops.push(
      meter(context, stream, $("agent-level"), (rms) => {
        talkline.agentPeak = Math.max(talkline.agentPeak, rms);
      }),
    );
  };
  pc.onconnectionstatechange = () => {
    if (call !== current) return;
    if (pc.connectionState === "connected") setState("live", "In call — speak now");
    if (pc.connectionState === "failed") hangUp("The connection failed (network or firewall).");
  };

  try {
    await pc.setLocalDescription(await pc.createOffer());
    await iceGathered(pc);
    let response;
    try {
      response = await fetch("/webrtc/offer", {
        method: "POST",
        headers: { "Content-Type": "application/sdp" },
        body: pc.localDescription.sdp,
      });
    } catch (e) {
      throw new Error("The talkline server cannot be reached. Is `talkline serve` running?");
    }
    if (response.status === 503) throw new Error("The server is busy with other calls; try again in a moment.");
    if (!response.ok) throw new Error(`The server refused the call: ${(await response.text()).trim()}`);
    current.location = response.headers.get("Location");
    await pc.setRemoteDescription({ type: "answer", sdp: await response.text() });
    await context.resume();
  } catch (e) {
    hangUp();
    showError(e.message);
  }
}

function hangUp(reason) {
  const current = call;
  call = null;
  if (current) {
    try {
      if (current.events.readyState === "open") current.events.send(JSON.stringify({ type: "bye" }));
    } catch (_) {}
    if (current.location) fetch(current.location, { method: "DELETE" }).catch(() => {});
    current.stops.forEach((stop) => stop());
    current.mic.getTracks().forEach((t) => t.stop());
    current.pc.close();
    current.context.close();
    if (current.audio) current.audio.srcObject = null;
  }
  setState("idle", reason || "Call ended");
}

$("call").addEventListener("click", startCall);
$("hangup").addEventListener("click", () => hangUp());
setState("idle", "Ready");
