"""Run time: the state a store carries between forwards, the block-wise prefill runner, kvpass's cache, reports."""
