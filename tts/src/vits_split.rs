//! Splits a Piper VITS model into its two halves: the *encoder* (text encoder, duration
//! predictor, flow: phoneme ids to the latent frames `z`) and the *decoder* (HiFi-GAN: `z` to
//! samples). The decoder is fully convolutional, so it can run on a window of frames at a time:
//! the first 0.3 s of a sentence is heard after the encoder and one short decoder run, instead
//! of after the whole sentence (the decoder is about 70% of the voice's time).
//!
//! Piper's exported `.onnx` is one graph; the split is made here at load time by cutting the
//! graph at the decoder's input (the `Conv` whose weight is `dec.conv_pre.weight`, the name of
//! the PyTorch module every Piper/VITS export keeps). A graph that does not look like that is
//! left whole and synthesized sentence by sentence, as before.
//!
//! Why by hand: the split only selects and re-emits whole protobuf fields (nodes, initializers,
//! inputs, outputs), which takes a small wire-format walker; the Rust ONNX crates either need
//! `protoc` at build time or bring a whole inference engine. No field is decoded beyond names.

use std::collections::{HashMap, HashSet};

/// The module path of HiFi-GAN's first convolution in every VITS export.
const DECODER_FIRST_WEIGHT: &str = "dec.conv_pre.weight";

/// A voice cut in two, as serialized ONNX models.
#[derive(Debug)]
pub struct SplitVoice {
    /// Phoneme ids (and scales, speaker) to `latent` (plus any other output of the whole model
    /// that does not need the decoder, such as durations).
    pub encoder: Vec<u8>,
    /// `latent` (and the speaker id, for multi-speaker voices) to the audio output.
    pub decoder: Vec<u8>,
    /// Name of the latent tensor: `[1, channels, frames]`, one frame per `hop_length` samples.
    pub latent: String,
    /// The encoder's outputs besides `latent`, in the whole model's order.
    pub encoder_extra_outputs: Vec<String>,
}

/// Splits `model` (a serialized ONNX `ModelProto`) at the decoder. `Ok(None)`: not a graph this
/// knows how to split (it still works whole). `Err`: the bytes are not valid protobuf.
pub fn split(model: &[u8]) -> Result<Option<SplitVoice>, String> {
    let model_fields = fields(model)?;
    let graph_fields: Vec<&Field<'_>> = model_fields
        .iter()
        .filter(|f| f.number == MODEL_GRAPH)
        .collect();
    let [graph] = graph_fields.as_slice() else {
        return Err(format!("{} graphs in the model", graph_fields.len()));
    };
    let graph = Graph::parse(graph.payload)?;
    if graph.has_subgraphs {
        return Ok(None);
    }
    let Some(cut) = graph.nodes.iter().find(|n| {
        n.op_type == "Conv" && n.inputs.get(1).map(String::as_str) == Some(DECODER_FIRST_WEIGHT)
    }) else {
        return Ok(None);
    };
    let Some(latent) = cut.inputs.first().cloned() else {
        return Ok(None);
    };
    if graph.outputs.is_empty() {
        return Ok(None);
    }
    let stop_at_latent: HashSet<&str> = [latent.as_str()].into();
    let mut decoder_outputs = Vec::new();
    let mut encoder_extra_outputs = Vec::new();
    for output in &graph.outputs {
        let cone = graph.cone(&stop_at_latent, &[output.name.as_str()])?;
        if cone.external.contains(latent.as_str()) {
            decoder_outputs.push(output.name.as_str());
        } else {
            encoder_extra_outputs.push(output.name.clone());
        }
    }
    // The audio (the first output) must come from the decoder, or this is not a VITS layout.
    if decoder_outputs.first() != Some(&graph.outputs[0].name.as_str()) {
        return Ok(None);
    }
    let mut encoder_outputs = vec![latent.as_str()];
    encoder_outputs.extend(encoder_extra_outputs.iter().map(String::as_str));
    let encoder = graph.extract(&HashSet::new(), &encoder_outputs)?;
    let decoder = graph.extract(&stop_at_latent, &decoder_outputs)?;
    Ok(Some(SplitVoice {
        encoder: model_with_graph(&model_fields, &encoder),
        decoder: model_with_graph(&model_fields, &decoder),
        latent,
        encoder_extra_outputs,
    }))
}

// Field numbers from onnx.proto.
const MODEL_GRAPH: u32 = 7;
const GRAPH_NODE: u32 = 1;
const GRAPH_INITIALIZER: u32 = 5;
const GRAPH_SPARSE_INITIALIZER: u32 = 15;
const GRAPH_INPUT: u32 = 11;
const GRAPH_OUTPUT: u32 = 12;
const GRAPH_VALUE_INFO: u32 = 13;
const GRAPH_QUANTIZATION_ANNOTATION: u32 = 14;
const NODE_INPUT: u32 = 1;
const NODE_OUTPUT: u32 = 2;
const NODE_OP_TYPE: u32 = 4;
const NODE_ATTRIBUTE: u32 = 5;
const ATTRIBUTE_GRAPH: u32 = 6;
const ATTRIBUTE_GRAPHS: u32 = 11;
const TENSOR_NAME: u32 = 8;
const VALUE_INFO_NAME: u32 = 1;

const WIRE_VARINT: u8 = 0;
const WIRE_FIXED64: u8 = 1;
const WIRE_LEN: u8 = 2;
const WIRE_FIXED32: u8 = 5;

/// One protobuf field: its number, and its bytes both whole (key included, to copy it as is)
/// and as a length-delimited payload.
#[derive(Debug)]
struct Field<'a> {
    number: u32,
    wire: u8,
    whole: &'a [u8],
    payload: &'a [u8],
}

fn read_varint(buf: &[u8], pos: &mut usize) -> Result<u64, String> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *buf.get(*pos).ok_or("truncated varint")?;
        *pos += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err("varint longer than 10 bytes".into())
}

fn fields(buf: &[u8]) -> Result<Vec<Field<'_>>, String> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let start = pos;
        let key = read_varint(buf, &mut pos)?;
        let number = u32::try_from(key >> 3).map_err(|_| "field number out of range")?;
        let wire = (key & 7) as u8;
        let payload_start;
        match wire {
            WIRE_VARINT => {
                read_varint(buf, &mut pos)?;
                payload_start = pos;
            }
            WIRE_FIXED64 | WIRE_FIXED32 => {
                let n = if wire == WIRE_FIXED64 { 8 } else { 4 };
                payload_start = pos;
                pos = pos
                    .checked_add(n)
                    .filter(|&end| end <= buf.len())
                    .ok_or("truncated fixed-width field")?;
            }
            WIRE_LEN => {
                let len = usize::try_from(read_varint(buf, &mut pos)?)
                    .map_err(|_| "length out of range")?;
                payload_start = pos;
                pos = pos
                    .checked_add(len)
                    .filter(|&end| end <= buf.len())
                    .ok_or("truncated length-delimited field")?;
            }
            other => return Err(format!("unsupported wire type {other}")),
        }
        out.push(Field {
            number,
            wire,
            whole: &buf[start..pos],
            payload: &buf[payload_start..pos],
        });
    }
    Ok(out)
}

fn string_field(f: &Field<'_>) -> Result<String, String> {
    if f.wire != WIRE_LEN {
        return Err(format!("field {} is not a string", f.number));
    }
    String::from_utf8(f.payload.to_vec()).map_err(|_| format!("field {} is not UTF-8", f.number))
}

/// The first string field `number` of a message, or "" (protobuf's default).
fn name_of(message: &[u8], number: u32) -> Result<String, String> {
    match fields(message)?.iter().find(|f| f.number == number) {
        Some(f) => string_field(f),
        None => Ok(String::new()),
    }
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_len_field(out: &mut Vec<u8>, number: u32, payload: &[u8]) {
    put_varint(out, (u64::from(number) << 3) | u64::from(WIRE_LEN));
    put_varint(out, payload.len() as u64);
    out.extend_from_slice(payload);
}

#[derive(Debug)]
struct Node<'a> {
    whole: &'a [u8],
    op_type: String,
    inputs: Vec<String>,
    outputs: Vec<String>,
}

#[derive(Debug)]
struct Named<'a> {
    name: String,
    whole: &'a [u8],
}

#[derive(Debug)]
struct Graph<'a> {
    nodes: Vec<Node<'a>>,
    initializers: Vec<Named<'a>>,
    inputs: Vec<Named<'a>>,
    outputs: Vec<Named<'a>>,
    value_info: Vec<Named<'a>>,
    /// Fields copied into both halves unchanged (name, doc string, metadata).
    other: Vec<&'a [u8]>,
    /// A node with a graph attribute (If, Loop, Scan) may read outer names invisibly.
    has_subgraphs: bool,
}

/// The nodes a set of outputs needs, and the names they read from outside those nodes.
struct Cone<'g> {
    nodes: HashSet<usize>,
    external: HashSet<&'g str>,
}

impl<'a> Graph<'a> {
    fn parse(bytes: &'a [u8]) -> Result<Self, String> {
        let mut graph = Graph {
            nodes: Vec::new(),
            initializers: Vec::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            value_info: Vec::new(),
            other: Vec::new(),
            has_subgraphs: false,
        };
        for f in fields(bytes)? {
            match f.number {
                GRAPH_NODE => {
                    let mut node = Node {
                        whole: f.whole,
                        op_type: String::new(),
                        inputs: Vec::new(),
                        outputs: Vec::new(),
                    };
                    for nf in fields(f.payload)? {
                        match nf.number {
                            NODE_INPUT => node.inputs.push(string_field(&nf)?),
                            NODE_OUTPUT => node.outputs.push(string_field(&nf)?),
                            NODE_OP_TYPE => node.op_type = string_field(&nf)?,
                            NODE_ATTRIBUTE => {
                                graph.has_subgraphs |= fields(nf.payload)?.iter().any(|a| {
                                    a.number == ATTRIBUTE_GRAPH || a.number == ATTRIBUTE_GRAPHS
                                });
                            }
                            _ => {}
                        }
                    }
                    graph.nodes.push(node);
                }
                GRAPH_INITIALIZER => graph.initializers.push(Named {
                    name: name_of(f.payload, TENSOR_NAME)?,
                    whole: f.whole,
                }),
                // Sparse initializers name their tensors one level deeper; none of the VITS
                // exports has one, so such a graph is not split.
                GRAPH_SPARSE_INITIALIZER => graph.has_subgraphs = true,
                GRAPH_INPUT | GRAPH_OUTPUT | GRAPH_VALUE_INFO => {
                    let named = Named {
                        name: name_of(f.payload, VALUE_INFO_NAME)?,
                        whole: f.whole,
                    };
                    match f.number {
                        GRAPH_INPUT => graph.inputs.push(named),
                        GRAPH_OUTPUT => graph.outputs.push(named),
                        _ => graph.value_info.push(named),
                    }
                }
                // Annotations name tensors that may not survive the cut.
                GRAPH_QUANTIZATION_ANNOTATION => {}
                _ => graph.other.push(f.whole),
            }
        }
        Ok(graph)
    }

    /// Walks back from `outputs` to graph inputs, initializers or `stop_at`.
    fn cone(&'a self, stop_at: &HashSet<&str>, outputs: &[&str]) -> Result<Cone<'a>, String> {
        let producer: HashMap<&str, usize> = self
            .nodes
            .iter()
            .enumerate()
            .flat_map(|(i, n)| n.outputs.iter().map(move |o| (o.as_str(), i)))
            .collect();
        let sources: HashSet<&str> = self
            .initializers
            .iter()
            .chain(&self.inputs)
            .map(|n| n.name.as_str())
            .collect();
        let mut cone = Cone {
            nodes: HashSet::new(),
            external: HashSet::new(),
        };
        let mut seen: HashSet<&str> = HashSet::new();
        let mut todo: Vec<&str> = Vec::new();
        for output in outputs {
            // The names handed in live in this graph too; look each up to borrow it from here.
            let own = producer
                .get_key_value(*output)
                .map(|(k, _)| *k)
                .or_else(|| sources.get(*output).copied())
                .ok_or_else(|| format!("no tensor {output:?} in the graph"))?;
            todo.push(own);
        }
        while let Some(name) = todo.pop() {
            if name.is_empty() || !seen.insert(name) {
                continue;
            }
            if stop_at.contains(name) && !outputs.contains(&name) {
                cone.external.insert(name);
                continue;
            }
            if let Some(&i) = producer.get(name) {
                if cone.nodes.insert(i) {
                    todo.extend(self.nodes[i].inputs.iter().map(String::as_str));
                }
            } else if sources.contains(name) {
                cone.external.insert(name);
            } else {
                return Err(format!("tensor {name:?} has no producer"));
            }
        }
        Ok(cone)
    }

    /// A serialized `GraphProto` computing `outputs` from the whole graph's inputs,
    /// initializers and `stop_at` (which become inputs).
    fn extract(&'a self, stop_at: &HashSet<&str>, outputs: &[&str]) -> Result<Vec<u8>, String> {
        let cone = self.cone(stop_at, outputs)?;
        let mut out = Vec::new();
        for (i, node) in self.nodes.iter().enumerate() {
            if cone.nodes.contains(&i) {
                out.extend_from_slice(node.whole);
            }
        }
        for other in &self.other {
            out.extend_from_slice(other);
        }
        for init in &self.initializers {
            if cone.external.contains(init.name.as_str()) {
                out.extend_from_slice(init.whole);
            }
        }
        let initializer_names: HashSet<&str> =
            self.initializers.iter().map(|n| n.name.as_str()).collect();
        for input in &self.inputs {
            if cone.external.contains(input.name.as_str()) {
                out.extend_from_slice(input.whole);
            }
        }
        let mut cut_inputs: Vec<&str> = stop_at
            .iter()
            .copied()
            .filter(|s| cone.external.contains(s) && !initializer_names.contains(s))
            .collect();
        cut_inputs.sort_unstable();
        for name in cut_inputs {
            out.extend_from_slice(&self.value_info_field(GRAPH_INPUT, name));
        }
        for name in outputs {
            match self.outputs.iter().find(|o| o.name == *name) {
                Some(o) => out.extend_from_slice(o.whole),
                None => out.extend_from_slice(&self.value_info_field(GRAPH_OUTPUT, name)),
            }
        }
        let produced: HashSet<&str> = cone
            .nodes
            .iter()
            .flat_map(|&i| self.nodes[i].outputs.iter().map(String::as_str))
            .collect();
        for vi in &self.value_info {
            let name = vi.name.as_str();
            if produced.contains(name) && !outputs.contains(&name) {
                out.extend_from_slice(vi.whole);
            }
        }
        Ok(out)
    }

    /// `name`'s `ValueInfoProto` as field `number` of a graph: the graph's own type for it when
    /// it has one, else a float tensor of unknown shape.
    fn value_info_field(&self, number: u32, name: &str) -> Vec<u8> {
        let mut payload = Vec::new();
        if let Some(vi) = self.value_info.iter().find(|v| v.name == name) {
            // Re-key the stored value_info (field 13) as an input or output.
            if let Ok(fs) = fields(vi.whole) {
                if let Some(f) = fs.first() {
                    payload.extend_from_slice(f.payload);
                }
            }
        }
        if payload.is_empty() {
            put_len_field(&mut payload, VALUE_INFO_NAME, name.as_bytes());
            // TypeProto { tensor_type: Tensor { elem_type: FLOAT } }
            let tensor = [0x08, 0x01];
            let mut type_proto = Vec::new();
            put_len_field(&mut type_proto, 1, &tensor);
            put_len_field(&mut payload, 2, &type_proto);
        }
        let mut out = Vec::new();
        put_len_field(&mut out, number, &payload);
        out
    }
}

/// `model` with its graph replaced; every other field (IR version, opsets, metadata) kept.
fn model_with_graph(model: &[Field<'_>], graph: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(graph.len() + 256);
    for f in model {
        if f.number == MODEL_GRAPH {
            put_len_field(&mut out, MODEL_GRAPH, graph);
        } else {
            out.extend_from_slice(f.whole);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(op: &str, inputs: &[&str], outputs: &[&str]) -> Vec<u8> {
        let mut n = Vec::new();
        for i in inputs {
            put_len_field(&mut n, NODE_INPUT, i.as_bytes());
        }
        for o in outputs {
            put_len_field(&mut n, NODE_OUTPUT, o.as_bytes());
        }
        put_len_field(&mut n, NODE_OP_TYPE, op.as_bytes());
        let mut f = Vec::new();
        put_len_field(&mut f, GRAPH_NODE, &n);
        f
    }

    fn named(number: u32, name_field: u32, name: &str) -> Vec<u8> {
        let mut m = Vec::new();
        put_len_field(&mut m, name_field, name.as_bytes());
        let mut f = Vec::new();
        put_len_field(&mut f, number, &m);
        f
    }

    /// ids -> enc -> flow -> z -> Conv(dec.conv_pre.weight) -> out, and ids -> durations.
    fn tiny_vits() -> Vec<u8> {
        let mut g = Vec::new();
        g.extend(node("Gather", &["emb", "input"], &["h"]));
        g.extend(node("Relu", &["h"], &["z"]));
        g.extend(node("Exp", &["h"], &["durations"]));
        g.extend(node("Conv", &["z", DECODER_FIRST_WEIGHT], &["c"]));
        g.extend(node("Tanh", &["c"], &["output"]));
        g.extend(named(GRAPH_INITIALIZER, TENSOR_NAME, "emb"));
        g.extend(named(GRAPH_INITIALIZER, TENSOR_NAME, DECODER_FIRST_WEIGHT));
        g.extend(named(GRAPH_INPUT, VALUE_INFO_NAME, "input"));
        g.extend(named(GRAPH_OUTPUT, VALUE_INFO_NAME, "output"));
        g.extend(named(GRAPH_OUTPUT, VALUE_INFO_NAME, "durations"));
        let mut m = Vec::new();
        m.extend([0x08, 0x08]); // ir_version 8
        put_len_field(&mut m, MODEL_GRAPH, &g);
        m
    }

    fn summary(model: &[u8]) -> (Vec<String>, Vec<String>, Vec<String>, Vec<String>) {
        let fs = fields(model).unwrap();
        assert_eq!(fs[0].whole, [0x08, 0x08], "other model fields are kept");
        let graph = fs.iter().find(|f| f.number == MODEL_GRAPH).unwrap();
        let g = Graph::parse(graph.payload).unwrap();
        let names = |v: &[Named<'_>]| v.iter().map(|n| n.name.clone()).collect();
        (
            g.nodes.iter().map(|n| n.op_type.clone()).collect(),
            names(&g.initializers),
            names(&g.inputs),
            names(&g.outputs),
        )
    }

    #[test]
    fn a_vits_graph_splits_at_the_decoders_first_convolution() {
        let split = split(&tiny_vits()).unwrap().expect("splits");
        assert_eq!(split.latent, "z");
        assert_eq!(split.encoder_extra_outputs, ["durations"]);
        assert_eq!(
            summary(&split.encoder),
            (
                vec!["Gather".into(), "Relu".into(), "Exp".into()],
                vec!["emb".into()],
                vec!["input".into()],
                vec!["z".into(), "durations".into()]
            )
        );
        assert_eq!(
            summary(&split.decoder),
            (
                vec!["Conv".into(), "Tanh".into()],
                vec![DECODER_FIRST_WEIGHT.into()],
                vec!["z".into()],
                vec!["output".into()]
            )
        );
    }

    #[test]
    fn a_graph_without_a_vits_decoder_is_left_whole() {
        let mut g = node("Relu", &["input"], &["output"]);
        g.extend(named(GRAPH_INPUT, VALUE_INFO_NAME, "input"));
        g.extend(named(GRAPH_OUTPUT, VALUE_INFO_NAME, "output"));
        let mut m = Vec::new();
        put_len_field(&mut m, MODEL_GRAPH, &g);
        assert!(split(&m).unwrap().is_none());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bytes in [&[0xff][..], &[0x3a, 0x05, 0x01], &[0x0b], &[0x80; 12]] {
            assert!(split(bytes).is_err(), "{bytes:?}");
        }
        // A node reading a tensor nothing produces.
        let mut g = node("Conv", &["ghost", DECODER_FIRST_WEIGHT], &["output"]);
        g.extend(named(GRAPH_OUTPUT, VALUE_INFO_NAME, "output"));
        let mut m = Vec::new();
        put_len_field(&mut m, MODEL_GRAPH, &g);
        assert!(split(&m).is_err());
    }
}
