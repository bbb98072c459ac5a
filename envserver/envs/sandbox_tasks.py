"""Built-in coding tasks of the Python sandbox, each with hidden tests and a reference solution.

A test is a snippet run against (a copy of) the agent's namespace after each step; it
passes when it raises nothing within the per-test time limit. Tests and solutions stay
on the server: only ``prompt`` reaches the agent.
"""

from __future__ import annotations

import msgspec


class Task(msgspec.Struct, frozen=True):
    name: str
    prompt: str
    tests: tuple[str, ...]
    solution: str  # passes every test; for checking the task set, never sent


def _task(name: str, prompt: str, solution: str, *tests: str) -> Task:
    return Task(name, prompt.strip(), tests, solution.strip() + "\n")


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        _task(
            "fizzbuzz",
            "Define fizzbuzz(n) returning a list of the strings for 1..n: 'Fizz' for multiples of 3, "
            "'Buzz' for multiples of 5, 'FizzBuzz' for both, else the number as a string.",
            "def fizzbuzz(n):\n    return ['FizzBuzz' if i % 15 == 0 else 'Fizz' if i % 3 == 0 else 'Buzz' if i % 5 == 0 else str(i) for i in range(1, n + 1)]",
            "assert fizzbuzz(5) == ['1', '2', 'Fizz', '4', 'Buzz']",
            "assert fizzbuzz(15)[-1] == 'FizzBuzz'",
            "assert fizzbuzz(0) == []",
            "assert fizzbuzz(30).count('FizzBuzz') == 2",
        ),
        _task(
            "reverse_words",
            "Define reverse_words(s) that returns the words of s in reverse order, joined by single spaces "
            "(words are separated by any whitespace).",
            "def reverse_words(s):\n    return ' '.join(reversed(s.split()))",
            "assert reverse_words('hello world') == 'world hello'",
            "assert reverse_words('  a   b c ') == 'c b a'",
            "assert reverse_words('') == ''",
            "assert reverse_words('one') == 'one'",
        ),
        _task(
            "is_palindrome",
            "Define is_palindrome(s) -> bool: True when s reads the same backwards, ignoring case and every "
            "character that is not a letter or digit.",
            "def is_palindrome(s):\n    t = [c.lower() for c in s if c.isalnum()]\n    return t == t[::-1]",
            "assert is_palindrome('A man, a plan, a canal: Panama')",
            "assert not is_palindrome('race a car')",
            "assert is_palindrome('')",
            "assert is_palindrome('No lemon, no melon')",
        ),
        _task(
            "primes_below",
            "Define primes_below(n) returning the sorted list of all primes smaller than n.",
            "def primes_below(n):\n    sieve = [True] * max(n, 0)\n    for i in range(2, n):\n        if sieve[i]:\n"
            "            for j in range(i * i, n, i):\n                sieve[j] = False\n    return [i for i in range(2, n) if sieve[i]]",
            "assert primes_below(10) == [2, 3, 5, 7]",
            "assert primes_below(2) == []",
            "assert len(primes_below(100000)) == 9592",
            "assert primes_below(3) == [2]",
        ),
        _task(
            "fibonacci",
            "Define fib(n) returning the n-th Fibonacci number with fib(0) == 0 and fib(1) == 1; it must be fast "
            "for n up to 10000.",
            "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a",
            "assert fib(0) == 0 and fib(1) == 1",
            "assert fib(10) == 55",
            "assert fib(90) == 2880067194370816120",
            "assert len(str(fib(10000))) == 2090",
        ),
        _task(
            "word_count",
            "Define word_count(text) returning a dict from each lowercased word to its count; words are runs of "
            "letters a-z (so punctuation and digits separate words).",
            "import re\ndef word_count(text):\n    counts = {}\n    for w in re.findall('[a-z]+', text.lower()):\n"
            "        counts[w] = counts.get(w, 0) + 1\n    return counts",
            "assert word_count('The cat and the hat.') == {'the': 2, 'cat': 1, 'and': 1, 'hat': 1}",
            "assert word_count('') == {}",
            "assert word_count(\"it's 2 o'clock\") == {'it': 1, 's': 1, 'o': 1, 'clock': 1}",
        ),
        _task(
            "flatten",
            "Define flatten(x) that turns arbitrarily nested lists and tuples into one flat list, keeping order; "
            "strings are not split.",
            "def flatten(x):\n    out = []\n    for item in x:\n        if isinstance(item, (list, tuple)):\n"
            "            out.extend(flatten(item))\n        else:\n            out.append(item)\n    return out",
            "assert flatten([1, [2, [3, (4, 5)]], 6]) == [1, 2, 3, 4, 5, 6]",
            "assert flatten([]) == []",
            "assert flatten(['ab', ['cd']]) == ['ab', 'cd']",
            "assert flatten([[[[]]]]) == []",
        ),
        _task(
            "two_sum",
            "Define two_sum(nums, target) returning a pair (i, j), i < j, of indices whose values add up to target, "
            "or None if there is none. It must run in linear time for 10^5 numbers.",
            "def two_sum(nums, target):\n    seen = {}\n    for j, v in enumerate(nums):\n        if target - v in seen:\n"
            "            return (seen[target - v], j)\n        seen.setdefault(v, j)\n    return None",
            "i, j = two_sum([2, 7, 11, 15], 9)\nassert (i, j) == (0, 1)",
            "assert two_sum([1, 2, 3], 7) is None",
            "i, j = two_sum([3, 3], 6)\nassert (i, j) == (0, 1)",
            "n = list(range(100000))\ni, j = two_sum(n, 199997)\nassert i < j and n[i] + n[j] == 199997",
        ),
        _task(
            "balanced_brackets",
            "Define balanced(s) -> bool: True when every (, [ and { in s is closed by the matching bracket in the "
            "right order; other characters are ignored.",
            "def balanced(s):\n    pairs = {')': '(', ']': '[', '}': '{'}\n    stack = []\n    for c in s:\n"
            "        if c in '([{':\n            stack.append(c)\n        elif c in pairs:\n"
            "            if not stack or stack.pop() != pairs[c]:\n                return False\n    return not stack",
            "assert balanced('([]{})')",
            "assert not balanced('([)]')",
            "assert not balanced('((')",
            "assert balanced('a(b)c[d]{e}') and balanced('')",
        ),
        _task(
            "roman_numerals",
            "Define to_roman(n) converting an integer 1 <= n <= 3999 to its Roman numeral (e.g. 1994 -> 'MCMXCIV').",
            "def to_roman(n):\n    out = ''\n    for v, s in [(1000, 'M'), (900, 'CM'), (500, 'D'), (400, 'CD'), (100, 'C'), (90, 'XC'),\n"
            "                 (50, 'L'), (40, 'XL'), (10, 'X'), (9, 'IX'), (5, 'V'), (4, 'IV'), (1, 'I')]:\n"
            "        while n >= v:\n            out += s\n            n -= v\n    return out",
            "assert to_roman(1994) == 'MCMXCIV'",
            "assert to_roman(4) == 'IV' and to_roman(9) == 'IX'",
            "assert to_roman(3999) == 'MMMCMXCIX'",
            "assert to_roman(1) == 'I'",
        ),
        _task(
            "run_length",
            "Define rle(s) that run-length encodes a string: 'aaabcc' -> 'a3b1c2'.",
            "def rle(s):\n    out, i = [], 0\n    while i < len(s):\n        j = i\n        while j < len(s) and s[j] == s[i]:\n"
            "            j += 1\n        out.append(f'{s[i]}{j - i}')\n        i = j\n    return ''.join(out)",
            "assert rle('aaabcc') == 'a3b1c2'",
            "assert rle('') == ''",
            "assert rle('z' * 12) == 'z12'",
            "assert rle('abab') == 'a1b1a1b1'",
        ),
        _task(
            "anagram_groups",
            "Define group_anagrams(words) returning a list of groups (lists) of words that are anagrams of each "
            "other; each group sorted, the groups sorted by their first word.",
            "def group_anagrams(words):\n    groups = {}\n    for w in words:\n        groups.setdefault(''.join(sorted(w)), []).append(w)\n"
            "    return sorted(sorted(g) for g in groups.values())",
            "assert group_anagrams(['eat', 'tea', 'tan', 'ate', 'nat', 'bat']) == [['ate', 'eat', 'tea'], ['bat'], ['nat', 'tan']]",
            "assert group_anagrams([]) == []",
            "assert group_anagrams(['a']) == [['a']]",
        ),
        _task(
            "matrix_multiply",
            "Define matmul(a, b) multiplying two matrices given as lists of rows (no numpy); raise ValueError when "
            "the shapes do not match.",
            "def matmul(a, b):\n    if not a or not b or len(a[0]) != len(b):\n        raise ValueError('shape mismatch')\n"
            "    return [[sum(x * y for x, y in zip(row, col)) for col in zip(*b)] for row in a]",
            "assert matmul([[1, 2], [3, 4]], [[5, 6], [7, 8]]) == [[19, 22], [43, 50]]",
            "assert matmul([[1, 2, 3]], [[1], [2], [3]]) == [[14]]",
            "try:\n    matmul([[1, 2]], [[1, 2]])\nexcept ValueError:\n    pass\nelse:\n    raise AssertionError",
        ),
        _task(
            "binary_search",
            "Define bsearch(items, x) returning the index of x in the sorted list items, or -1; it must use "
            "O(log n) comparisons.",
            "def bsearch(items, x):\n    lo, hi = 0, len(items) - 1\n    while lo <= hi:\n        mid = (lo + hi) // 2\n"
            "        if items[mid] == x:\n            return mid\n        if items[mid] < x:\n            lo = mid + 1\n"
            "        else:\n            hi = mid - 1\n    return -1",
            "assert bsearch([1, 3, 5, 7], 5) == 2",
            "assert bsearch([1, 3, 5, 7], 4) == -1",
            "assert bsearch([], 1) == -1",
            "class C(int):\n    calls = 0\n    __hash__ = int.__hash__\n    def __lt__(self, o):\n        C.calls += 1\n        return int(self) < int(o)\n"
            "    def __eq__(self, o):\n        C.calls += 1\n        return int(self) == int(o)\n"
            "items = [C(i) for i in range(1 << 16)]\nassert bsearch(items, 12345) == 12345 and C.calls < 64",
        ),
        _task(
            "caesar_cipher",
            "Define caesar(text, k) shifting each ASCII letter k places along the alphabet (wrapping, keeping case); "
            "other characters stay as they are. k may be negative or larger than 26.",
            "def caesar(text, k):\n    out = []\n    for c in text:\n        if c.isascii() and c.isalpha():\n"
            "            base = ord('a') if c.islower() else ord('A')\n            c = chr(base + (ord(c) - base + k) % 26)\n"
            "        out.append(c)\n    return ''.join(out)",
            "assert caesar('abc', 1) == 'bcd'",
            "assert caesar('Hello, World!', 13) == 'Uryyb, Jbeyq!'",
            "assert caesar('xyz', 29) == 'abc' and caesar('abc', -1) == 'zab'",
        ),
        _task(
            "dedupe_keep_order",
            "Define dedupe(items) returning the items without repeats, keeping the first occurrence of each and "
            "the original order (items are hashable).",
            "def dedupe(items):\n    return list(dict.fromkeys(items))",
            "assert dedupe([3, 1, 3, 2, 1]) == [3, 1, 2]",
            "assert dedupe([]) == []",
            "assert dedupe('mississippi') == ['m', 'i', 's', 'p']",
        ),
        _task(
            "lru_cache_class",
            "Define a class LRUCache(capacity) with get(key) (the value, or -1 when missing) and put(key, value); "
            "when full, put evicts the least recently used key (get counts as a use).",
            "from collections import OrderedDict\nclass LRUCache:\n    def __init__(self, capacity):\n"
            "        self.capacity, self.data = capacity, OrderedDict()\n    def get(self, key):\n"
            "        if key not in self.data:\n            return -1\n        self.data.move_to_end(key)\n        return self.data[key]\n"
            "    def put(self, key, value):\n        self.data[key] = value\n        self.data.move_to_end(key)\n"
            "        if len(self.data) > self.capacity:\n            self.data.popitem(last=False)",
            "c = LRUCache(2)\nc.put(1, 1)\nc.put(2, 2)\nassert c.get(1) == 1\nc.put(3, 3)\nassert c.get(2) == -1",
            "c = LRUCache(1)\nc.put('a', 1)\nc.put('a', 2)\nassert c.get('a') == 2",
            "c = LRUCache(2)\nassert c.get(9) == -1",
        ),
        _task(
            "merge_intervals",
            "Define merge(intervals) that merges overlapping [start, end] intervals (touching ones merge too) and "
            "returns them sorted by start as a list of [start, end] lists.",
            "def merge(intervals):\n    out = []\n    for s, e in sorted(intervals):\n        if out and s <= out[-1][1]:\n"
            "            out[-1][1] = max(out[-1][1], e)\n        else:\n            out.append([s, e])\n    return out",
            "assert merge([[1, 3], [2, 6], [8, 10], [15, 18]]) == [[1, 6], [8, 10], [15, 18]]",
            "assert merge([[1, 4], [4, 5]]) == [[1, 5]]",
            "assert merge([]) == []",
            "assert merge([[5, 6], [1, 2]]) == [[1, 2], [5, 6]]",
        ),
        _task(
            "digit_sum",
            "Define digital_root(n) for n >= 0: repeatedly sum the decimal digits until one digit remains.",
            "def digital_root(n):\n    while n >= 10:\n        n = sum(map(int, str(n)))\n    return n",
            "assert digital_root(16) == 7",
            "assert digital_root(942) == 6",
            "assert digital_root(0) == 0",
            "assert digital_root(10 ** 100 - 1) == 9",
        ),
        _task(
            "parse_csv_totals",
            "Define totals(csv_text) that reads CSV text with a header row 'name,amount' and returns a dict from "
            "name to the sum of its amounts as floats. Quoted fields may contain commas.",
            "import csv, io\ndef totals(csv_text):\n    out = {}\n    for row in csv.DictReader(io.StringIO(csv_text)):\n"
            "        out[row['name']] = out.get(row['name'], 0.0) + float(row['amount'])\n    return out",
            "assert totals('name,amount\\na,1\\nb,2.5\\na,3\\n') == {'a': 4.0, 'b': 2.5}",
            "assert totals('name,amount\\n') == {}",
            "assert totals('name,amount\\n\"Smith, J\",2\\n') == {'Smith, J': 2.0}",
        ),
    ]
}
