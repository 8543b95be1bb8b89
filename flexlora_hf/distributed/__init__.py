"""FSDP2 (`fully_shard`) support: adapter tensors and Adam moments sharded across processes.
"""
