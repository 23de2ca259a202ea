package imagecli

import (
	"errors"
	"fmt"
	"math"
	"math/big"
	"strings"
)

var errInvalidSize = errors.New("invalid size")

// unitShift maps a size suffix to its power of 1024, as QEMU's qemu_strtosz.
var unitShift = map[byte]uint{'b': 0, 'k': 10, 'm': 20, 'g': 30, 't': 40, 'p': 50, 'e': 60}

// parseSize parses SIZE the way qemu-img does: decimal or 0x hex bytes, an
// optional case-insensitive B/K/M/G/T/P/E suffix in powers of 1024, and a
// decimal fraction when a suffix above B follows ("1.5G", "0.5k"; the result
// is rounded down to a whole byte). "Ki" and "KiB" spellings are accepted
// too. The result is between 0 and MaxInt64.
func parseSize(s string) (int64, error) {
	v, err := parseSizeBig(strings.TrimSpace(s))
	if err != nil {
		return 0, fmt.Errorf("%w %q: %v", errInvalidSize, s, err)
	}
	if !v.IsInt64() {
		return 0, fmt.Errorf("%w %q: must be between 0 and %d", errInvalidSize, s, int64(math.MaxInt64))
	}
	return v.Int64(), nil
}

func parseSizeBig(s string) (*big.Int, error) {
	num, suffix := splitNumber(s)
	shift, err := parseSuffix(suffix)
	if err != nil {
		return nil, err
	}
	whole, frac, isFrac := strings.Cut(num, ".")
	n := new(big.Int)
	switch {
	case num == "":
		return nil, errors.New("no number; use bytes with an optional K, M, G, T, P or E suffix")
	case strings.HasPrefix(strings.ToLower(num), "0x"):
		if _, ok := n.SetString(num[2:], 16); !ok || strings.ContainsAny(num[2:], "+-_") {
			return nil, errors.New("bad hex number")
		}
		return n.Lsh(n, shift), nil
	case isFrac && shift == 0:
		return nil, errors.New("a fraction needs a K, M, G, T, P or E suffix")
	}
	digits := whole + frac
	if digits == "" || strings.Trim(digits, "0123456789") != "" {
		return nil, errors.New("use bytes with an optional K, M, G, T, P or E suffix")
	}
	n.SetString(digits, 10)
	n.Lsh(n, shift)
	den := new(big.Int).Exp(big.NewInt(10), big.NewInt(int64(len(frac))), nil)
	return n.Quo(n, den), nil
}

// splitNumber splits "1.5GiB" into "1.5" and "GiB". Hex digits a-f are part
// of the number only after "0x".
func splitNumber(s string) (num, suffix string) {
	hex := len(s) > 1 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')
	i := 0
	if hex {
		i = 2
	}
	for i < len(s) && (isDigit(s[i]) || s[i] == '.' || hex && isHexLetter(s[i])) {
		i++
	}
	// In hex "0x10b" the b is a digit; "0x10 B" is not worth supporting.
	return s[:i], s[i:]
}

func isDigit(c byte) bool     { return c >= '0' && c <= '9' }
func isHexLetter(c byte) bool { return c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F' }

func parseSuffix(suffix string) (uint, error) {
	if suffix == "" {
		return 0, nil
	}
	shift, ok := unitShift[lower(suffix[0])]
	rest := suffix[1:]
	if ok && shift > 0 && (rest == "i" || rest == "iB") {
		rest = ""
	}
	if !ok || rest != "" {
		return 0, fmt.Errorf("unknown suffix %q; use K, M, G, T, P or E (powers of 1024)", suffix)
	}
	return shift, nil
}

func lower(c byte) byte {
	if c >= 'A' && c <= 'Z' {
		return c + 'a' - 'A'
	}
	return c
}

// parseResize parses resize's [+|-]SIZE against the current size.
func parseResize(s string, current int64) (int64, error) {
	var sign int64
	switch {
	case strings.HasPrefix(s, "+"):
		sign, s = 1, s[1:]
	case strings.HasPrefix(s, "-"):
		sign, s = -1, s[1:]
	}
	n, err := parseSize(s)
	if err != nil {
		return 0, err
	}
	switch {
	case sign == 0:
		return n, nil
	case sign > 0 && n > math.MaxInt64-current:
		return 0, fmt.Errorf("%w: %d + %d is too large", errInvalidSize, current, n)
	default:
		return current + sign*n, nil
	}
}

var sizeSuffixes = []string{"", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"}

// formatSize renders bytes like QEMU's size_to_str: three significant
// digits and a binary unit, moving to the next unit once the number would
// reach 1000 ("196 KiB", "1 GiB", "1.5 MiB", "0 B").
func formatSize(v int64) string {
	_, exp := math.Frexp(float64(v) / (1000.0 / 1024.0))
	i := (exp - 1) / 10
	i = max(0, min(i, len(sizeSuffixes)-1))
	div := float64(uint64(1) << (10 * i))
	return fmt.Sprintf("%.3g %sB", float64(v)/div, sizeSuffixes[i])
}
