//! The ONNX model of a classification export: a small, real graph with the input and output a
//! Custom Vision compact classifier has, written as protobuf by hand (six messages of the ONNX
//! schema; no protobuf toolchain), with weights seeded from the iteration id so the same
//! iteration always exports the same bytes and different iterations differ.
//!
//! The graph: `data` float32 [1,3,224,224] (NCHW, BGR, 0–255) → AveragePool 32×32 → Flatten →
//! Gemm (147 → one logit per tag) → Softmax (Multiclass) or Sigmoid (Multilabel) →
//! `model_output` float32 [1,tags]. IR version 3 and opset 7, as ONNX 1.2 writes them and as a
//! real export reports itself; under IR 3 every initializer is also a graph input.

use uuid::Uuid;

/// The input's name and side, as Custom Vision's compact classifiers take it.
const INPUT: &str = "data";
const SIDE: i64 = 224;
/// The output: one score per line of `labels.txt`, in that order.
const OUTPUT: &str = "model_output";
/// The pooling window: 224 / 32 = a 7×7 grid per channel, 147 features.
const POOL: i64 = 32;
const FEATURES: usize = (3 * (SIDE / POOL) * (SIDE / POOL)) as usize;
/// Keeps logits of 0–255 pixels in a range where the scores are not all 0 or 1.
const WEIGHT_SCALE: f32 = 0.002;

const IR_VERSION: i64 = 3;
const OPSET: i64 = 7;

/// The image metadata Microsoft's export samples read (`Image.BitmapPixelFormat` `Bgr8` swaps
/// channels, `Image.NominalPixelRange` `NominalRange_0_255` skips dividing by 255).
const METADATA: [(&str, &str); 3] = [
    ("Image.BitmapPixelFormat", "Bgr8"),
    ("Image.ColorSpaceGamma", "SRGB"),
    ("Image.NominalPixelRange", "NominalRange_0_255"),
];

/// The classifier for `iteration` with `tags` outputs (at least one: a training has tags, and a
/// zero-wide output would not be a model). `multilabel` picks Sigmoid over Softmax.
pub fn classifier(iteration: Uuid, tags: usize, multilabel: bool) -> Vec<u8> {
    let tags = tags.max(1);
    let mut rng = SplitMix(fold(iteration));
    let weights: Vec<f32> = (0..FEATURES * tags)
        .map(|_| rng.unit() * WEIGHT_SCALE)
        .collect();
    let bias: Vec<f32> = (0..tags).map(|_| rng.unit()).collect();
    let n = tags as i64;

    let mut graph = Pb::default();
    graph.message(
        1,
        node(
            "AveragePool",
            &[INPUT],
            "pooled",
            &[
                ints("kernel_shape", &[POOL, POOL]),
                ints("strides", &[POOL, POOL]),
            ],
        ),
    );
    graph.message(
        1,
        node("Flatten", &["pooled"], "features", &[int("axis", 1)]),
    );
    graph.message(1, node("Gemm", &["features", "W", "B"], "logits", &[]));
    let last = if multilabel {
        node("Sigmoid", &["logits"], OUTPUT, &[])
    } else {
        node("Softmax", &["logits"], OUTPUT, &[int("axis", 1)])
    };
    graph.message(1, last);
    graph.string(2, "cvchain_standin_classifier");
    graph.message(5, tensor("W", &[FEATURES as i64, n], &weights));
    graph.message(5, tensor("B", &[n], &bias));
    graph.message(11, value_info(INPUT, &[1, 3, SIDE, SIDE]));
    graph.message(11, value_info("W", &[FEATURES as i64, n]));
    graph.message(11, value_info("B", &[n]));
    graph.message(12, value_info(OUTPUT, &[1, n]));

    let mut model = Pb::default();
    model.int(1, IR_VERSION);
    model.string(2, "cvchain-standin");
    model.string(3, env!("CARGO_PKG_VERSION"));
    model.string(4, "onnxml");
    model.int(5, 0);
    model.string(
        6,
        &format!(
            "cvchain stand-in model of iteration {iteration}: Custom Vision's input and output, \
             weights seeded from the iteration id, not trained on the images"
        ),
    );
    model.message(7, graph);
    let mut opset = Pb::default();
    opset.string(1, "");
    opset.int(2, OPSET);
    model.message(8, opset);
    for (key, value) in METADATA {
        let mut entry = Pb::default();
        entry.string(1, key);
        entry.string(2, value);
        model.message(14, entry);
    }
    model.0
}

/// A protobuf message being written (proto2 wire format: varints, length-delimited fields,
/// little-endian fixed32).
#[derive(Default)]
struct Pb(Vec<u8>);

impl Pb {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8 & 0x7f) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    fn key(&mut self, field: u32, wire: u8) {
        self.varint((u64::from(field) << 3) | u64::from(wire));
    }

    /// An int64 or enum field (negative numbers as ten-byte varints, as protobuf does).
    fn int(&mut self, field: u32, v: i64) {
        self.key(field, 0);
        self.varint(v as u64);
    }

    fn bytes(&mut self, field: u32, b: &[u8]) {
        self.key(field, 2);
        self.varint(b.len() as u64);
        self.0.extend_from_slice(b);
    }

    fn string(&mut self, field: u32, s: &str) {
        self.bytes(field, s.as_bytes());
    }

    fn message(&mut self, field: u32, m: Pb) {
        self.bytes(field, &m.0);
    }
}

/// An AttributeProto of type INT (2).
fn int(name: &str, v: i64) -> Pb {
    let mut a = Pb::default();
    a.string(1, name);
    a.int(3, v);
    a.int(20, 2);
    a
}

/// An AttributeProto of type INTS (7).
fn ints(name: &str, vs: &[i64]) -> Pb {
    let mut a = Pb::default();
    a.string(1, name);
    for v in vs {
        a.int(8, *v);
    }
    a.int(20, 7);
    a
}

/// A NodeProto of the default domain, named after its output.
fn node(op: &str, inputs: &[&str], output: &str, attributes: &[Pb]) -> Pb {
    let mut n = Pb::default();
    for i in inputs {
        n.string(1, i);
    }
    n.string(2, output);
    n.string(3, output);
    n.string(4, op);
    for a in attributes {
        n.bytes(5, &a.0);
    }
    n
}

/// A float TensorProto (data type 1) with its values as little-endian raw data.
fn tensor(name: &str, dims: &[i64], values: &[f32]) -> Pb {
    let mut t = Pb::default();
    for d in dims {
        t.int(1, *d);
    }
    t.int(2, 1);
    t.string(8, name);
    let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    t.bytes(9, &raw);
    t
}

/// A ValueInfoProto of a float tensor with fixed dims.
fn value_info(name: &str, dims: &[i64]) -> Pb {
    let mut shape = Pb::default();
    for d in dims {
        let mut dim = Pb::default();
        dim.int(1, *d);
        shape.message(1, dim);
    }
    let mut tensor_type = Pb::default();
    tensor_type.int(1, 1);
    tensor_type.message(2, shape);
    let mut ty = Pb::default();
    ty.message(1, tensor_type);
    let mut v = Pb::default();
    v.string(1, name);
    v.message(2, ty);
    v
}

fn fold(id: Uuid) -> u64 {
    let v = id.as_u128();
    (v >> 64) as u64 ^ v as u64
}

/// SplitMix64: a few lines, the same numbers on every platform.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1), exactly representable (24 bits).
    fn unit(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u32 << 23) as f32) - 1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_and_keys_are_protobufs() {
        let mut p = Pb::default();
        p.int(1, 3);
        p.int(2, 300);
        p.int(3, -1);
        p.string(4, "ab");
        assert_eq!(
            p.0,
            [
                &[0x08, 3, 0x10, 0xac, 0x02, 0x18][..],
                &[0xff; 9],
                &[0x01, 0x22, 2, b'a', b'b'],
            ]
            .concat()
        );
    }

    #[test]
    fn the_same_iteration_makes_the_same_model_and_another_a_different_one() {
        let a = Uuid::from_u128(1);
        let b = Uuid::from_u128(2);
        assert_eq!(classifier(a, 3, false), classifier(a, 3, false));
        assert_ne!(classifier(a, 3, false), classifier(b, 3, false));
        assert_ne!(classifier(a, 3, false), classifier(a, 3, true));
        assert_ne!(classifier(a, 3, false), classifier(a, 4, false));
    }

    #[test]
    fn weights_grow_with_the_tags_and_stay_small() {
        let two = classifier(Uuid::from_u128(7), 2, false).len();
        let three = classifier(Uuid::from_u128(7), 3, false).len();
        // One column of 147 weights and one bias more, as raw float32.
        assert_eq!(three - two, (FEATURES + 1) * 4);
        assert!(two < 2048, "{two}");
    }

    #[test]
    fn no_tags_still_makes_a_model_with_one_output() {
        assert_eq!(
            classifier(Uuid::nil(), 0, false),
            classifier(Uuid::nil(), 1, false)
        );
    }

    #[test]
    fn unit_numbers_stay_in_range() {
        let mut r = SplitMix(0);
        for _ in 0..10_000 {
            let u = r.unit();
            assert!((-1.0..1.0).contains(&u), "{u}");
        }
    }
}
