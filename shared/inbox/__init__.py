"""The transactional inbox: every message consumed from Kafka is stored once, keyed by its
message id, and then handled exactly once in a transaction that also marks it processed.

A message that cannot be parsed is parked at once (one whose envelope parses, but whose type or
payload this service does not know, with its id and payload, to be replayed once it does); one
whose handler keeps failing is retried and, after `max_attempts` (a try lost with its worker
counts as one, found by the sweeper; a try held up by another session's lock does not), parked
with its last error. Parked messages stay in the table for an operator and never block the
messages behind them.

The modules, each with one job:

- model: the inbox_messages table (InboxMessage).
- storing: records consumed from Kafka stored as rows, once each (the consumer's side).
- taken_ids: messages under a message id another message has taken told from repeats, and parked
  under ids of their own (for storing).
- handling: stored messages handled, each once, in the caller's transaction; failed tries counted,
  and messages parked when they cannot succeed (the handler tasks' side).
- sweeping: messages whose dispatch or try was lost, claimed to be handed over again (or parked,
  their lost tries at the limit).
- committed_lines: what handling and sweeping did to a message (handled, parked) said once it
  has committed, with the message's request id.
- parked: parked messages listed, handed back to be handled, or discarded (the operator's side).
- pruning: the rows of messages handled long ago deleted.
"""
