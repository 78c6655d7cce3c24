pub mod clock;
pub mod engine;
pub mod proto {
    tonic::include_proto!("arbiter.v1");
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("arbiter_descriptor");
}
