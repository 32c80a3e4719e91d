//! Messages encoded once and sent many times.
//!
//! The control plane sends the same destination answer to every proxy that watches that
//! destination (a 5,000-endpoint service watched by 1,000 proxies is one answer, not 1,000).
//! [`Encoded`] holds the protobuf bytes of a message, cheap to clone (reference counted), and
//! [`EncodedCodec`] writes them as they are: the proxies decode an ordinary message.

use std::marker::PhantomData;

use bytes::{BufMut as _, Bytes};
use prost::Message;
use tonic::codec::{BufferSettings, Codec, EncodeBuf, Encoder};
use tonic::Status;

/// The protobuf encoding of an `M`, made once.
pub struct Encoded<M> {
    bytes: Bytes,
    _message: PhantomData<fn() -> M>,
}

impl<M: Message> Encoded<M> {
    pub fn new(message: &M) -> Self {
        Self {
            bytes: message.encode_to_vec().into(),
            _message: PhantomData,
        }
    }
}

impl<M> Encoded<M> {
    /// The encoded bytes (what goes on the wire as the gRPC message).
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

impl<M: Message + Default> Encoded<M> {
    /// Decodes the message again (tests, diagnostics).
    pub fn decode(&self) -> Result<M, prost::DecodeError> {
        M::decode(self.bytes.clone())
    }
}

impl<M> Clone for Encoded<M> {
    fn clone(&self) -> Self {
        Self {
            bytes: self.bytes.clone(),
            _message: PhantomData,
        }
    }
}

impl<M> PartialEq for Encoded<M> {
    fn eq(&self, other: &Self) -> bool {
        self.bytes == other.bytes
    }
}

impl<M> std::fmt::Debug for Encoded<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Encoded<{}>({} bytes)",
            std::any::type_name::<M>(),
            self.bytes.len()
        )
    }
}

/// The first size of a stream's send buffer.
const STREAM_BUFFER: usize = 256;
/// tonic's default: a buffer this full is sent without waiting for more messages.
const BUFFER_YIELD: usize = 32 * 1024;

/// Sends [`Encoded`] messages as they are; decodes requests with prost.
pub struct EncodedCodec<T, U>(PhantomData<fn() -> (T, U)>);

impl<T, U> Default for EncodedCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<M, U> Codec for EncodedCodec<Encoded<M>, U>
where
    M: Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = Encoded<M>;
    type Decode = U;
    type Encoder = EncodedEncoder<M>;
    type Decoder = tonic_prost::ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        EncodedEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        // Requests are a few hundred bytes.
        tonic_prost::ProstCodec::<U, U>::raw_decoder(BufferSettings::new(1024, BUFFER_YIELD))
    }
}

/// Copies an [`Encoded`] message into the gRPC frame.
pub struct EncodedEncoder<M>(PhantomData<fn() -> M>);

impl<M> Encoder for EncodedEncoder<M> {
    type Item = Encoded<M>;
    type Error = Status;

    fn encode(&mut self, item: Self::Item, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item.bytes);
        Ok(())
    }

    /// tonic allocates the buffer for each stream up front (8 KiB by default) and keeps it
    /// for the stream's life; a control plane holds tens of thousands of mostly idle streams
    /// whose answers are a few hundred bytes, so it starts small and grows to the message.
    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(STREAM_BUFFER, BUFFER_YIELD)
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
