"""Kafka plumbing: topic names and settings, log readers and writers, the Avro codec, records."""
