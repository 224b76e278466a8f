"""Generated protobuf / gRPC stubs for Shoal's wire protocol (see shoal.proto)."""
