"""The step log, replay and resumption, fault_tolerant runs killed from outside."""
