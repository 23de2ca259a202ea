package imagecli

import (
	"encoding/json"
	"io"
)

// writeJSON prints v as qemu-img does: four-space indent, a final newline,
// no HTML escaping (file names may contain '&' or '<').
func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false)
	enc.SetIndent("", "    ")
	return enc.Encode(v)
}
