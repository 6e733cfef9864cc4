//! `turbine epp`: an Endpoint Picker for the Kubernetes Gateway API Inference Extension.
//!
//! A gateway (Envoy, or any proxy that speaks Envoy's external-processing protocol) asks
//! it, for every request to an InferencePool, which endpoint should serve the request. It
//! answers with the worker whose KV cache holds most of the prompt and which is not too
//! busy: the same router as the frontend's, fed the same way (the workers' KV events and
//! load reports, through discovery and the event plane), asked through
//! [`crate::router::service::RouterCore::pick`].
//!
//! - [`proto`]: the ext_proc messages (hand-written prost structs) and the tonic service;
//! - [`exchange`]: one stream's conversation (headers, body, answers, the subset hint, the
//!   503 and error answers), pure over a [`exchange::Pick`];
//! - [`picker`]: the decision (parse, tokenize, hash, route, endpoint and hints);
//! - this module: [`EndpointPicker`], the service that runs an [`exchange::Exchange`] per
//!   stream. `node::epp` composes the process.

pub mod exchange;
pub mod picker;
pub mod proto;

use exchange::{Exchange, Pick};
use futures::StreamExt;
use proto::{ExternalProcessor, ProcessingRequest, ResponseStream};
use std::sync::Arc;

/// The ext_proc service: one [`Exchange`] per `Process` stream, decisions by `P`.
pub struct EndpointPicker<P> {
    picker: Arc<P>,
}

impl<P: Pick + 'static> EndpointPicker<P> {
    pub fn new(picker: Arc<P>) -> EndpointPicker<P> {
        EndpointPicker { picker }
    }
}

impl<P: Pick + 'static> ExternalProcessor for EndpointPicker<P> {
    fn process(&self, requests: tonic::Streaming<ProcessingRequest>) -> ResponseStream {
        let state = (requests, Exchange::default(), self.picker.clone(), false);
        futures::stream::unfold(
            state,
            |(mut requests, mut exchange, picker, ended)| async move {
                if ended {
                    return None;
                }
                loop {
                    // The proxy closing its side (or going away) ends the conversation.
                    let msg = match requests.message().await {
                        Ok(Some(msg)) => msg,
                        Ok(None) | Err(_) => return None,
                    };
                    match exchange.on_message(msg, picker.as_ref()) {
                        Ok(Some(answer)) => {
                            return Some((Ok(answer), (requests, exchange, picker, false)))
                        }
                        Ok(None) => continue,
                        Err(status) => {
                            return Some((Err(status), (requests, exchange, picker, true)))
                        }
                    }
                }
            },
        )
        .boxed()
    }
}
