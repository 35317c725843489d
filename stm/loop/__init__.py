"""The segment loop: a stream read a segment at a time under a memory (`segments`), and decoding under it
(`generation`)."""
