// Package stats holds the small statistics the benchmarks share.
package stats

import "sort"

// Median of xs (0 for none); noisy emulated runs are reported by medians.
func Median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}
