# Chapter 10: the element masks of four block patterns, with the block grid.
# Data: 10_block_sparse/patterns.dat, first line "# block B tokens T ...", then one gnuplot index per pattern of
# lines "query key value": 1 = inside a full block, 0.5 = allowed inside a partial block, 0 = masked inside a
# partial block (the causal edge), NaN = a block that is never visited.
load 'style.gp'
set terminal svg enhanced size 760,760 font 'sans-serif,12' background rgb 'white'
set output outfile

data = datadir.'/10_block_sparse/patterns.dat'
B = int(system("sed -n '1s/^# block \\([0-9]*\\) tokens.*/\\1/p' '".data."'"))
T = int(system("sed -n '1s/^# block [0-9]* tokens \\([0-9]*\\);.*/\\1/p' '".data."'"))
name(n) = system(sprintf("sed -n 's/^# pattern \"\\(.*\\)\"$/\\1/p' '%s' | sed -n '%dp'", data, n))

set multiplot layout 2, 2 title sprintf("Block patterns, T = %d tokens, block B = %d\n{/*0.8 dark: full block; light: allowed in a partial block; grey: never visited}", T, B) font 'sans-serif,14'
set size ratio -1
set xrange [-0.5 : T - 0.5]
set yrange [T - 0.5 : -0.5]
set xtics 0, B font ',10'
set ytics 0, B font ',10'
set grid xtics ytics front linecolor rgb '#4d4d4d' linewidth 0.6
set cbrange [0 : 1]
unset colorbox
set border 15
unset key
set xlabel 'key position' font ',11'
set ylabel 'query position' font ',11'
set object 1 rectangle from graph 0, 0 to graph 1, 1 behind fillcolor rgb masked_colour fillstyle solid noborder
do for [n = 0 : 3] {
  set title name(n + 1) noenhanced font ',12'
  plot data index n using ($2 - 0.0) : 1 : 3 with image pixels
}
unset multiplot
