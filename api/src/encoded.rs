//! Messages encoded once and sent many times.
//!
//! The control plane sends the same destination answer to every proxy that watches that
//! destination (a 5,000-endpoint service watched by 1,000 proxies is one answer, not 1,000).
//! [`Encoded`] holds a message's gRPC frame (the 5-byte prefix and the protobuf bytes), cheap
//! to clone (reference counted), and the hand-written server ([`crate::shared`]) sends that
//! frame as it is: the proxies decode an ordinary message.

use std::marker::PhantomData;

use bytes::{BufMut as _, Bytes};
use prost::Message;

/// gRPC's length prefix: a compression flag and the message length (big endian).
const PREFIX: usize = 5;

/// The gRPC frame of an `M`, encoded once.
pub struct Encoded<M> {
    frame: Bytes,
    _message: PhantomData<fn() -> M>,
}

impl<M: Message> Encoded<M> {
    /// Encodes `message`. A message over 4 GiB cannot be framed by gRPC; the control plane's
    /// answers are bounded far below (see `limits`), so this is a bug, not bad input.
    pub fn new(message: &M) -> Self {
        let len = message.encoded_len();
        let framed_len = u32::try_from(len).expect("a gRPC message is under 4 GiB");
        let mut frame = Vec::with_capacity(PREFIX + len);
        frame.put_u8(0); // not compressed
        frame.put_u32(framed_len);
        message.encode_raw(&mut frame);
        Self {
            frame: frame.into(),
            _message: PhantomData,
        }
    }
}

impl<M> Encoded<M> {
    /// The protobuf bytes of the message.
    pub fn bytes(&self) -> Bytes {
        self.frame.slice(PREFIX..)
    }

    /// The whole gRPC frame: what goes on the wire.
    pub fn frame(&self) -> &Bytes {
        &self.frame
    }

    /// The message's length (without the frame's prefix).
    pub fn len(&self) -> usize {
        self.frame.len() - PREFIX
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<M: Message + Default> Encoded<M> {
    /// Decodes the message again (tests, diagnostics).
    pub fn decode(&self) -> Result<M, prost::DecodeError> {
        M::decode(self.bytes())
    }
}

impl<M> Clone for Encoded<M> {
    fn clone(&self) -> Self {
        Self {
            frame: self.frame.clone(),
            _message: PhantomData,
        }
    }
}

impl<M> PartialEq for Encoded<M> {
    fn eq(&self, other: &Self) -> bool {
        self.frame == other.frame
    }
}

impl<M> std::fmt::Debug for Encoded<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Encoded<{}>({} bytes)",
            std::any::type_name::<M>(),
            self.len()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::{destination_update::Update, Destination, DestinationUpdate, Endpoint};

    #[test]
    fn an_encoded_answer_decodes_as_the_message() {
        let answer = DestinationUpdate {
            update: Some(Update::Destination(Destination {
                service: "web.shop.svc.cluster.local:80".into(),
                endpoints: vec![Endpoint {
                    ip: "10.0.0.2".into(),
                    port: 8080,
                    meshed: true,
                    ..Default::default()
                }],
                ..Default::default()
            })),
        };
        let encoded = Encoded::new(&answer);
        assert_eq!(encoded.clone(), encoded);
        assert_eq!(encoded.decode(), Ok(answer));
    }
}
