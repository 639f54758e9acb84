"""Kafka plumbing: topic names and settings, log readers/writers, the Avro codec, record builders."""
