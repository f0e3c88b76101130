//! The codec of meshward's own services: tonic's prost codec with small
//! per-call buffers.
//!
//! tonic allocates an encode and a decode buffer for every call, 8 KiB
//! each by default, and keeps them as long as the call lasts. A proxy's
//! distribution stream lasts as long as the proxy runs, and the server
//! holds one per connected proxy, though what flows on it is mostly small:
//! ACKs of a few bytes, deltas of a few hundred. So these buffers start at
//! 1 KiB; a larger message (a full snapshot, an applied file) still goes
//! through whole, since the buffers grow to the message at hand (tonic
//! reserves a message's length as soon as its header is read).

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::ProstCodec;

/// The initial size of each buffer.
const BUFFER_SIZE: usize = 1024;
/// How much ready-to-send data is batched into one write at most (tonic's
/// default).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// [`ProstCodec`] with [`BUFFER_SIZE`] buffers; the generated code of
/// `meshward.v1` uses it (`build.rs`).
#[derive(Debug, Clone, Copy)]
pub struct SmallBuffers<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallBuffers<T, U> {
    fn default() -> Self {
        SmallBuffers(PhantomData)
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD)
}

impl<T, U> Codec for SmallBuffers<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = <ProstCodec<T, U> as Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings())
    }
}
