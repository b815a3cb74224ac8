"""etcd v3 API messages (protoc output; README.md here says where the protos come from)."""
