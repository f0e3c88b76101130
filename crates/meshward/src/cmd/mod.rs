pub mod ca;
pub mod check;
pub mod control;
pub mod describe;
pub mod proxy;
pub mod server;
pub mod validate;
