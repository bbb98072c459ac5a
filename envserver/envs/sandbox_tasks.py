"""Built-in coding tasks of the Python sandbox: a prompt, an entry point, hidden test inputs, a reference solution.

A hidden test is a call: ``Call(args)`` calls the agent's function ``entry(*args)``;
``Calls(args, calls)`` constructs the agent's class ``entry(*args)`` and then calls each
``(method, args)`` in turn, the test's result being the list of what they returned. The
expected results are never written here: the grader computes them on the server by
running ``solution`` (trusted code) on the same inputs, and compares the agent's results
with them exactly (``sandbox_grader.py``). Where several answers are right, ``checker``
decides on the server, from the inputs, the expected result and the agent's result.

This module stays on the server: in namespace isolation the sandbox cannot see the
envserver package at all. Only ``prompt`` reaches the agent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec


class Call(msgspec.Struct, frozen=True):
    """Call the entry function with ``args``; the result is its return value."""

    args: tuple[Any, ...]


class Calls(msgspec.Struct, frozen=True):
    """Construct the entry class with ``args``, then call each ``(method, args)``; the result is the list of returns."""

    args: tuple[Any, ...]
    calls: tuple[tuple[str, tuple[Any, ...]], ...]


Test = Call | Calls
Checker = Callable[[tuple[Any, ...], Any, Any], bool]  # (args, expected, actual) -> right?


class Task(msgspec.Struct, frozen=True):
    name: str
    prompt: str
    entry: str  # the function or class the agent must define
    tests: tuple[Test, ...]
    solution: str  # passes every test: the grader's source of expected results, never sent
    checker: Checker | None = None


def _task(name: str, prompt: str, entry: str, solution: str, *tests: Test, checker: Checker | None = None) -> Task:
    return Task(name, prompt.strip(), entry, tests, solution.strip() + "\n", checker)


def _call(*args: Any) -> Call:
    return Call(args)


def _two_sum_ok(args: tuple[Any, ...], expected: Any, actual: Any) -> bool:
    """Any pair of indices i < j whose values add up to the target; None only when there is none."""
    nums, target = args
    if expected is None:
        return actual is None
    if type(actual) is not tuple or len(actual) != 2 or any(type(k) is not int for k in actual):
        return False
    i, j = actual
    return 0 <= i < j < len(nums) and nums[i] + nums[j] == target


_LARGE = list(range(100000))
_SORTED = list(range(0, 1 << 17, 2))

TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        _task(
            "fizzbuzz",
            "Define fizzbuzz(n) returning a list of the strings for 1..n: 'Fizz' for multiples of 3, "
            "'Buzz' for multiples of 5, 'FizzBuzz' for both, else the number as a string.",
            "fizzbuzz",
            "def fizzbuzz(n):\n    return ['FizzBuzz' if i % 15 == 0 else 'Fizz' if i % 3 == 0 else 'Buzz' if i % 5 == 0 else str(i) for i in range(1, n + 1)]",
            _call(5),
            _call(15),
            _call(0),
            _call(30),
        ),
        _task(
            "reverse_words",
            "Define reverse_words(s) that returns the words of s in reverse order, joined by single spaces "
            "(words are separated by any whitespace).",
            "reverse_words",
            "def reverse_words(s):\n    return ' '.join(reversed(s.split()))",
            _call("hello world"),
            _call("  a   b c "),
            _call(""),
            _call("one"),
        ),
        _task(
            "is_palindrome",
            "Define is_palindrome(s) -> bool: True when s reads the same backwards, ignoring case and every "
            "character that is not a letter or digit.",
            "is_palindrome",
            "def is_palindrome(s):\n    t = [c.lower() for c in s if c.isalnum()]\n    return t == t[::-1]",
            _call("A man, a plan, a canal: Panama"),
            _call("race a car"),
            _call(""),
            _call("No lemon, no melon"),
        ),
        _task(
            "primes_below",
            "Define primes_below(n) returning the sorted list of all primes smaller than n.",
            "primes_below",
            "def primes_below(n):\n    sieve = [True] * max(n, 0)\n    for i in range(2, n):\n        if sieve[i]:\n"
            "            for j in range(i * i, n, i):\n                sieve[j] = False\n    return [i for i in range(2, n) if sieve[i]]",
            _call(10),
            _call(2),
            _call(100000),
            _call(3),
        ),
        _task(
            "fibonacci",
            "Define fib(n) returning the n-th Fibonacci number with fib(0) == 0 and fib(1) == 1; it must be fast "
            "for n up to 10000.",
            "fib",
            "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a",
            _call(0),
            _call(1),
            _call(10),
            _call(90),
            _call(10000),
        ),
        _task(
            "word_count",
            "Define word_count(text) returning a dict from each lowercased word to its count; words are runs of "
            "letters a-z (so punctuation and digits separate words).",
            "word_count",
            "import re\ndef word_count(text):\n    counts = {}\n    for w in re.findall('[a-z]+', text.lower()):\n"
            "        counts[w] = counts.get(w, 0) + 1\n    return counts",
            _call("The cat and the hat."),
            _call(""),
            _call("it's 2 o'clock"),
        ),
        _task(
            "flatten",
            "Define flatten(x) that turns arbitrarily nested lists and tuples into one flat list, keeping order; "
            "strings are not split.",
            "flatten",
            "def flatten(x):\n    out = []\n    for item in x:\n        if isinstance(item, (list, tuple)):\n"
            "            out.extend(flatten(item))\n        else:\n            out.append(item)\n    return out",
            _call([1, [2, [3, (4, 5)]], 6]),
            _call([]),
            _call(["ab", ["cd"]]),
            _call([[[[]]]]),
        ),
        _task(
            "two_sum",
            "Define two_sum(nums, target) returning a tuple (i, j), i < j, of indices whose values add up to target, "
            "or None if there is none. It must run in linear time for 10^5 numbers.",
            "two_sum",
            "def two_sum(nums, target):\n    seen = {}\n    for j, v in enumerate(nums):\n        if target - v in seen:\n"
            "            return (seen[target - v], j)\n        seen.setdefault(v, j)\n    return None",
            _call([2, 7, 11, 15], 9),
            _call([1, 2, 3], 7),
            _call([3, 3], 6),
            _call(_LARGE, 199997),
            checker=_two_sum_ok,
        ),
        _task(
            "balanced_brackets",
            "Define balanced(s) -> bool: True when every (, [ and { in s is closed by the matching bracket in the "
            "right order; other characters are ignored.",
            "balanced",
            "def balanced(s):\n    pairs = {')': '(', ']': '[', '}': '{'}\n    stack = []\n    for c in s:\n"
            "        if c in '([{':\n            stack.append(c)\n        elif c in pairs:\n"
            "            if not stack or stack.pop() != pairs[c]:\n                return False\n    return not stack",
            _call("([]{})"),
            _call("([)]"),
            _call("(("),
            _call("a(b)c[d]{e}"),
            _call(""),
        ),
        _task(
            "roman_numerals",
            "Define to_roman(n) converting an integer 1 <= n <= 3999 to its Roman numeral (e.g. 1994 -> 'MCMXCIV').",
            "to_roman",
            "def to_roman(n):\n    out = ''\n    for v, s in [(1000, 'M'), (900, 'CM'), (500, 'D'), (400, 'CD'), (100, 'C'), (90, 'XC'),\n"
            "                 (50, 'L'), (40, 'XL'), (10, 'X'), (9, 'IX'), (5, 'V'), (4, 'IV'), (1, 'I')]:\n"
            "        while n >= v:\n            out += s\n            n -= v\n    return out",
            _call(1994),
            _call(4),
            _call(9),
            _call(3999),
            _call(1),
        ),
        _task(
            "run_length",
            "Define rle(s) that run-length encodes a string: 'aaabcc' -> 'a3b1c2'.",
            "rle",
            "def rle(s):\n    out, i = [], 0\n    while i < len(s):\n        j = i\n        while j < len(s) and s[j] == s[i]:\n"
            "            j += 1\n        out.append(f'{s[i]}{j - i}')\n        i = j\n    return ''.join(out)",
            _call("aaabcc"),
            _call(""),
            _call("z" * 12),
            _call("abab"),
        ),
        _task(
            "anagram_groups",
            "Define group_anagrams(words) returning a list of groups (lists) of words that are anagrams of each "
            "other; each group sorted, the groups sorted by their first word.",
            "group_anagrams",
            "def group_anagrams(words):\n    groups = {}\n    for w in words:\n        groups.setdefault(''.join(sorted(w)), []).append(w)\n"
            "    return sorted(sorted(g) for g in groups.values())",
            _call(["eat", "tea", "tan", "ate", "nat", "bat"]),
            _call([]),
            _call(["a"]),
        ),
        _task(
            "matrix_multiply",
            "Define matmul(a, b) multiplying two matrices given as lists of rows (no numpy); raise ValueError when "
            "the shapes do not match.",
            "matmul",
            "def matmul(a, b):\n    if not a or not b or len(a[0]) != len(b):\n        raise ValueError('shape mismatch')\n"
            "    return [[sum(x * y for x, y in zip(row, col)) for col in zip(*b)] for row in a]",
            _call([[1, 2], [3, 4]], [[5, 6], [7, 8]]),
            _call([[1, 2, 3]], [[1], [2], [3]]),
            _call([[1, 2]], [[1, 2]]),
        ),
        # The old comparison-counting test needed the agent's own objects; a grader that only sees
        # returned values cannot count comparisons, so O(log n) is asked for but not checked.
        _task(
            "binary_search",
            "Define bsearch(items, x) returning the index of x in the sorted list items, or -1; it must use "
            "O(log n) comparisons.",
            "bsearch",
            "def bsearch(items, x):\n    lo, hi = 0, len(items) - 1\n    while lo <= hi:\n        mid = (lo + hi) // 2\n"
            "        if items[mid] == x:\n            return mid\n        if items[mid] < x:\n            lo = mid + 1\n"
            "        else:\n            hi = mid - 1\n    return -1",
            _call([1, 3, 5, 7], 5),
            _call([1, 3, 5, 7], 4),
            _call([], 1),
            _call(_SORTED, 12346),
            _call(_SORTED, 12345),
        ),
        _task(
            "caesar_cipher",
            "Define caesar(text, k) shifting each ASCII letter k places along the alphabet (wrapping, keeping case); "
            "other characters stay as they are. k may be negative or larger than 26.",
            "caesar",
            "def caesar(text, k):\n    out = []\n    for c in text:\n        if c.isascii() and c.isalpha():\n"
            "            base = ord('a') if c.islower() else ord('A')\n            c = chr(base + (ord(c) - base + k) % 26)\n"
            "        out.append(c)\n    return ''.join(out)",
            _call("abc", 1),
            _call("Hello, World!", 13),
            _call("xyz", 29),
            _call("abc", -1),
        ),
        _task(
            "dedupe_keep_order",
            "Define dedupe(items) returning the items without repeats, keeping the first occurrence of each and "
            "the original order (items are hashable).",
            "dedupe",
            "def dedupe(items):\n    return list(dict.fromkeys(items))",
            _call([3, 1, 3, 2, 1]),
            _call([]),
            _call("mississippi"),
        ),
        _task(
            "lru_cache_class",
            "Define a class LRUCache(capacity) with get(key) (the value, or -1 when missing) and put(key, value); "
            "when full, put evicts the least recently used key (get counts as a use).",
            "LRUCache",
            "from collections import OrderedDict\nclass LRUCache:\n    def __init__(self, capacity):\n"
            "        self.capacity, self.data = capacity, OrderedDict()\n    def get(self, key):\n"
            "        if key not in self.data:\n            return -1\n        self.data.move_to_end(key)\n        return self.data[key]\n"
            "    def put(self, key, value):\n        self.data[key] = value\n        self.data.move_to_end(key)\n"
            "        if len(self.data) > self.capacity:\n            self.data.popitem(last=False)",
            Calls((2,), (("put", (1, 1)), ("put", (2, 2)), ("get", (1,)), ("put", (3, 3)), ("get", (2,)), ("get", (3,)))),
            Calls((1,), (("put", ("a", 1)), ("put", ("a", 2)), ("get", ("a",)))),
            Calls((2,), (("get", (9,)),)),
        ),
        _task(
            "merge_intervals",
            "Define merge(intervals) that merges overlapping [start, end] intervals (touching ones merge too) and "
            "returns them sorted by start as a list of [start, end] lists.",
            "merge",
            "def merge(intervals):\n    out = []\n    for s, e in sorted(intervals):\n        if out and s <= out[-1][1]:\n"
            "            out[-1][1] = max(out[-1][1], e)\n        else:\n            out.append([s, e])\n    return out",
            _call([[1, 3], [2, 6], [8, 10], [15, 18]]),
            _call([[1, 4], [4, 5]]),
            _call([]),
            _call([[5, 6], [1, 2]]),
        ),
        _task(
            "digit_sum",
            "Define digital_root(n) for n >= 0: repeatedly sum the decimal digits until one digit remains.",
            "digital_root",
            "def digital_root(n):\n    while n >= 10:\n        n = sum(map(int, str(n)))\n    return n",
            _call(16),
            _call(942),
            _call(0),
            _call(10**100 - 1),
        ),
        _task(
            "parse_csv_totals",
            "Define totals(csv_text) that reads CSV text with a header row 'name,amount' and returns a dict from "
            "name to the sum of its amounts as floats. Quoted fields may contain commas.",
            "totals",
            "import csv, io\ndef totals(csv_text):\n    out = {}\n    for row in csv.DictReader(io.StringIO(csv_text)):\n"
            "        out[row['name']] = out.get(row['name'], 0.0) + float(row['amount'])\n    return out",
            _call("name,amount\na,1\nb,2.5\na,3\n"),
            _call("name,amount\n"),
            _call('name,amount\n"Smith, J",2\n'),
        ),
    ]
}
