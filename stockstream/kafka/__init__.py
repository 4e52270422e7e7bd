"""Kafka plumbing shared by every stage: clients built from one connection config (`clients`),
the topics and their creation (`topics`), reading a partition back (`readback`) and the base
of the services that consume with their own group (`consumer_service`)."""
