"""The pool of local workers: idle workers and recycling (`pool`), the
parent's end of one worker (`channel`), their lifecycles as tables
(`lifecycle`)."""
