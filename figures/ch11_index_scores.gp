# Chapter 11: one decode query's lightning-indexer scores over a context of 4096 tokens, the 64 tokens the top-k
# keeps marked, and dense attention's weight on each token (mean over MLA heads), for two constructed inputs: a
# needle far back and a pattern repeated 32 times. Data: 11_deepseek_sparse_attention/index_scores.dat, two
# blocks (needle, repeated) of "position index_score selected dense_mass".
load 'style.gp'

data = datadir.'/11_deepseek_sparse_attention/index_scores.dat'
set terminal svg enhanced size 900, 640 font 'sans-serif,12' background rgb 'white'
set output outfile
set multiplot layout 2, 1 title 'Indexer scores of one decode query (k = 64 selected, context 4096)' font 'sans-serif,15'
set xlabel 'cached token (position)'
set xrange [0 : 4096]
set key top right font ',11'
do for [block = 0 : 1] {
  set title (block == 0 ? 'a needle at position 64' : 'the needle repeated 32 times') font 'sans-serif,13'
  set ylabel 'index score'
  set y2label 'dense attention weight'
  set y2tics nomirror
  set ytics nomirror
  # The scores as one line (a point per token would make a megabyte of SVG); the attention weight only where it
  # is visible at this scale (above 1e-3).
  plot data index block using 1 : 2 with lines linewidth 0.5 linecolor rgb '#9ecae1' title 'index score', \
       data index block using 1 : ($3 > 0 ? $2 : NaN) with points linetype 2 pointsize 0.6 title 'selected (top-64)', \
       data index block using 1 : ($4 > 1e-3 ? $4 : NaN) axes x1y2 with impulses linetype 3 linewidth 1.2 \
         title 'dense attention weight'
}
unset multiplot
