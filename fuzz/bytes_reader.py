"""A pure-Python stand-in for atheris.FuzzedDataProvider: decisions read from a byte
string, front to back; past its end every read answers 0 (so any input is a program)."""


class Bytes:
    def __init__(self, data):
        self.data = bytes(data)
        self.pos = 0

    def remaining(self):
        return len(self.data) - self.pos

    def byte(self):
        if self.pos >= len(self.data):
            return 0
        b = self.data[self.pos]
        self.pos += 1
        return b

    def uint(self, nbytes):
        v = 0
        for _ in range(nbytes):
            v = (v << 8) | self.byte()
        return v

    def below(self, n):
        """An int in [0, n)."""
        if n <= 1:
            return 0
        nbytes = (max(n - 1, 1).bit_length() + 7) // 8
        return self.uint(nbytes) % n

    def pick(self, seq):
        return seq[self.below(len(seq))]

    def flag(self):
        return bool(self.byte() & 1)

    def take(self, n):
        b = self.data[self.pos:self.pos + n]
        self.pos += len(b)
        return b

    def rest(self):
        return self.take(self.remaining())
