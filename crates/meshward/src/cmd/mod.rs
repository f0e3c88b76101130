pub mod ca;
pub mod check;
pub mod describe;
pub mod validate;
