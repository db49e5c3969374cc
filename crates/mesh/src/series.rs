//! One method's call series (go-grpc-prometheus's started, handled by code, and handling time),
//! resolved once: recording a call builds no label and looks nothing up.

use std::sync::OnceLock;
use std::time::Duration;

use prometheus::{Histogram, HistogramVec, IntCounter, IntCounterVec};
use tonic::Code;

use crate::status::code_name;

/// The three vectors a side (client or server) records its calls in; their labels are three
/// of the method's (e.g. type or peer, service, method), and the handled one's also the code.
#[derive(Debug, Clone)]
pub struct CallVecs {
    pub started: IntCounterVec,
    pub handled: IntCounterVec,
    pub handling: HistogramVec,
}

/// One method's series in [`CallVecs`].
#[derive(Debug)]
pub struct CallSeries {
    labels: [String; 3],
    started: IntCounter,
    handling: Histogram,
    handled_by_code: IntCounterVec,
    /// `handled` by code (the index), each made on its code's first call: a code never seen
    /// is no series.
    handled: [OnceLock<IntCounter>; 17],
}

impl CallSeries {
    /// The series of the method `labels` names.
    pub fn new(vecs: &CallVecs, labels: [&str; 3]) -> Self {
        Self {
            labels: labels.map(str::to_owned),
            started: vecs.started.with_label_values(&labels),
            handling: vecs.handling.with_label_values(&labels),
            handled_by_code: vecs.handled.clone(),
            handled: Default::default(),
        }
    }

    /// The labels the series were made with.
    pub fn labels(&self) -> [&str; 3] {
        [&self.labels[0], &self.labels[1], &self.labels[2]]
    }

    /// A call started.
    pub fn start(&self) {
        self.started.inc();
    }

    /// A call ended with `code` after `took`.
    pub fn finish(&self, code: Code, took: Duration) {
        self.handled[code as usize]
            .get_or_init(|| {
                let [a, b, c] = self.labels();
                self.handled_by_code
                    .with_label_values(&[a, b, c, code_name(code)])
            })
            .inc();
        self.handling.observe(took.as_secs_f64());
    }
}
